#!/usr/bin/env bash
# Boot the built guests under QEMU TCG (never KVM here) and check the init protocol.
#   guest/selftest.sh [minimal|distro]...     (default: both)
# Needs qemu-system-x86 and e2fsprogs; run guest/build.sh first.
set -euo pipefail
GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$GUEST_DIR/out
WORK=$(mktemp -d /tmp/kvmsharp-guest-selftest.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
TIMEOUT=${TIMEOUT:-300}
fails=0

b64() { printf '%s' "$1" | base64 -w0; }

# qemu KERNEL INITRD APPEND [extra qemu args...] -> console log in $WORK/log
qemu() {
    local kernel=$1 initrd=$2 append=$3; shift 3
    local t0=$SECONDS
    timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -M q35 -m 512 -smp 2 -nographic -no-reboot \
        -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 panic=-1 $append" "$@" \
        < /dev/null > "$WORK/log" 2>&1 || true
    tr -d '\r' < "$WORK/log" > "$WORK/log.txt"
    echo "    ($((SECONDS - t0)) s wall)"
}
expect() { # description regex
    if grep -Eq "$2" "$WORK/log.txt"; then echo "  ok   $1"
    else echo "  FAIL $1 (no /$2/ in console output)"; fails=$((fails + 1))
        sed 's/^/       | /' "$WORK/log.txt" | tail -25; fi
}

make_disk() {
    mkdir -p "$WORK/disk"
    echo "hello from the virtio disk" > "$WORK/disk/hello.txt"
    truncate -s 32M "$WORK/disk.img"
    mke2fs -q -t ext4 -d "$WORK/disk" "$WORK/disk.img"
}

test_minimal() {
    local k=$OUT/minimal/bzImage i=$OUT/initrd.cpio
    echo "minimal: bzImage + initrd.cpio, run command, poweroff"
    qemu "$k" "$i" "kvmsharp.run=$(b64 'echo hello; grep -c ^processor /proc/cpuinfo; nproc; cat /mnt/x 2>/dev/null; mount -t ext4 /dev/vda /mnt && cat /mnt/hello.txt; echo a b | xargs echo applets; dd if=/dev/zero of=/tmp/l.img bs=1k count=1024 2>/dev/null; mke2fs -F -q /tmp/l.img && mkdir /tmp/m && mount -o loop /tmp/l.img /tmp/m && echo loop-ok; exit 7') kvmsharp.exit=poweroff" \
        -drive file="$WORK/disk.img",if=virtio,format=raw -device virtio-rng-pci
    expect "KVMSHARP-READY" '^KVMSHARP-READY$'
    expect "KVMSHARP-BEGIN" '^KVMSHARP-BEGIN$'
    expect "command output" '^hello$'
    expect "2 CPUs" '^2$'
    expect "virtio disk (ext4) readable" '^hello from the virtio disk$'
    expect "applets without symlinks (xargs runs echo)" '^applets a b$'
    expect "loop device on demand (mount -o loop)" '^loop-ok$'
    expect "KVMSHARP-END rc=7" '^KVMSHARP-END rc=7$'
    expect "powered off" 'reboot: Power down'

    echo "minimal: vmlinux (ELF) + reboot"
    qemu "$OUT/minimal/vmlinux" "$i" "kvmsharp.run=$(b64 'true') reboot=k"
    expect "ELF boots to init" '^KVMSHARP-READY$'
    expect "KVMSHARP-END rc=0" '^KVMSHARP-END rc=0$'
    expect "rebooted" 'reboot: Restarting system'

    echo "minimal: kvmsharp.exit=panic"
    qemu "$k" "$i" "kvmsharp.run=$(b64 'exit 3') kvmsharp.exit=panic"
    expect "KVMSHARP-END rc=3" '^KVMSHARP-END rc=3$'
    expect "panic on init exit" 'Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300'

    echo "minimal: bad base64, halt (qemu does not exit on halt: 60 s timeout)"
    TIMEOUT=60 qemu "$k" "$i" "kvmsharp.run=@@@ kvmsharp.exit=halt"
    expect "KVMSHARP-END rc=254" '^KVMSHARP-END rc=254$'
    expect "halted" 'reboot: System halted'

    echo "minimal: virtio-mmio device from the command line"
    qemu "$k" "$i" "virtio_mmio.device=4K@0xfeb00000:12 kvmsharp.run=$(b64 'ls /sys/bus/platform/devices/ | grep virtio') kvmsharp.exit=poweroff"
    expect "virtio-mmio platform device" 'virtio-mmio\.0'
}

test_distro() {
    echo "distro: vmlinuz + distro/initrd.cpio, virtio-PCI blk/net/rng/balloon/console"
    qemu "$OUT/distro/vmlinuz" "$OUT/distro/initrd.cpio" \
        "kvmsharp.run=$(b64 'uname -r; for d in /sys/bus/virtio/devices/*; do echo "dev $(cat $d/device) $(basename $(readlink $d/driver))"; done; mount -t ext4 /dev/vda /mnt && cat /mnt/hello.txt; ip -o link show eth0; cat /sys/class/misc/hw_random/rng_current') kvmsharp.exit=poweroff" \
        -drive file="$WORK/disk.img",if=virtio,format=raw -device virtio-rng-pci -device virtio-balloon-pci \
        -netdev user,id=n0 -device virtio-net-pci,netdev=n0 -device virtio-serial-pci
    expect "KVMSHARP-READY" '^KVMSHARP-READY$'
    expect "no insmod failures" '^KVMSHARP-BEGIN$'
    if grep -q 'insmod .* failed' "$WORK/log.txt"; then echo "  FAIL insmod failures:"; grep 'insmod .* failed' "$WORK/log.txt"; fails=$((fails + 1)); fi
    expect "distro kernel" '^6\.1\.0-[0-9]+-amd64$'
    expect "virtio_blk bound" '^dev 0x0002 virtio_blk$'
    expect "virtio_net bound" '^dev 0x0001 virtio_net$'
    expect "virtio_rng bound" '^dev 0x0004 virtio_rng$'
    expect "virtio_balloon bound" '^dev 0x0005 virtio_balloon$'
    expect "virtio_console bound" '^dev 0x0003 virtio_console$'
    expect "virtio disk (ext4) readable" '^hello from the virtio disk$'
    expect "eth0 present" 'eth0:'
    expect "KVMSHARP-END rc=0" '^KVMSHARP-END rc=0$'
    expect "powered off" 'reboot: Power down'
}

make_disk
[ $# -gt 0 ] || set -- minimal distro
for t in "$@"; do "test_$t"; done
[ $fails = 0 ] && echo "selftest: all passed" || { echo "selftest: $fails failed"; exit 1; }
