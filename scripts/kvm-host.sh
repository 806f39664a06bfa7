#!/usr/bin/env bash
# Run a command where a usable /dev/kvm exists.
#
#   scripts/kvm-host.sh [--timeout SECONDS] [--quiet] -- CMD [ARG...]
#   scripts/kvm-host.sh --where        prints "direct" or "nested": where CMD would run
#
# Where this machine has a usable /dev/kvm (hardware KVM, or a PVM host), CMD runs directly.
# Otherwise it runs inside a throw-away "nested KVM host": a VM under QEMU's software emulator
# (TCG, -cpu max: emulated AMD-V with nested paging) booting Debian's own kernel, which loads
# kvm_amd (guest/kvmhost-init; ../shared/nested-kvm.md). In there CMD sees this machine's whole
# file tree (virtio-9p), the same working directory, environment and PATH, and a /dev/kvm; its
# output comes back on stdout (stdout and stderr merged), and its exit status is this script's.
#
# Environment:
#   KVMSHARP_KVM_HOST=auto|direct|nested  where to run (default auto: direct if /dev/kvm opens)
#   KVMSHARP_L1_CPUS    vCPUs of the nested host (default: this machine's cores)
#   KVMSHARP_L1_MEMORY  its RAM (default 12G; TCG allocates only what the guest touches)
#   KVMSHARP_L1_TCG_THREAD  multi (default: one host thread per vCPU) or single (one for all)
#   KVMSHARP_L1_QEMU    the QEMU binary for the nested host (default: the pinned one guest/build.sh unpacks)
#   KVMSHARP_L1_APPEND  more words for the nested host's kernel command line (e.g. kvm_amd.npt=0)
#   KVMSHARP_HOST_TIMEOUT  seconds before the nested host is killed (default 7200; --timeout wins)
#   KVMSHARP_CACHE      guest cache (see guest/build.sh)
#
# Exit status: CMD's; 124 when the nested host timed out; 125 when it failed (no /dev/kvm in it,
# kernel panic, watchdog, QEMU error): one line saying so, then its last console lines on stderr.
# Inside, TMPDIR is a tmpfs of the nested host (/run/tmp): sockets and FIFOs must stay off 9p.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

timeout_s=${KVMSHARP_HOST_TIMEOUT:-7200}
quiet=0 where=0
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) timeout_s=$2; shift 2 ;;
        --timeout=*) timeout_s=${1#--timeout=}; shift ;;
        --quiet) quiet=1; shift ;;
        --where) where=1; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done
if [ $# -eq 0 ] && [ "$where" = 0 ]; then
    sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
case "$timeout_s" in ''|*[!0-9]*) echo "kvm-host: --timeout needs whole seconds, not '$timeout_s'" >&2; exit 2 ;; esac

note() { [ "$quiet" = 1 ] || echo "kvm-host: $*" >&2; }

kvm_usable() { [ -c /dev/kvm ] && { exec 3<>/dev/kvm; } 2>/dev/null && exec 3>&-; }

mode=${KVMSHARP_KVM_HOST:-auto}
case "$mode" in
    auto) if kvm_usable; then mode=direct; else mode=nested; fi ;;
    direct|nested) ;;
    *) echo "kvm-host: KVMSHARP_KVM_HOST must be auto, direct or nested, not '$mode'" >&2; exit 2 ;;
esac

[ "$where" = 1 ] && { echo "$mode"; exit 0; }
if [ "$mode" = direct ]; then
    kvm_usable || { echo "kvm-host: KVMSHARP_KVM_HOST=direct, but /dev/kvm is missing or cannot be opened" >&2; exit 125; }
    exec timeout --foreground -k 10 "$timeout_s" "$@"
fi

# ---- nested: one throw-away L1 per call --------------------------------------------------------
GUEST_OUT=$ROOT/guest/out
if ! "$ROOT/guest/build.sh" --check --only kvmhost >/dev/null 2>&1; then
    "$ROOT/guest/build.sh" --only kvmhost >&2 || { echo "kvm-host: building the nested host failed (guest/build.sh --only kvmhost)" >&2; exit 125; }
fi
kernel=$GUEST_OUT/kvmhost/vmlinuz initrd=$GUEST_OUT/kvmhost/initrd.cpio
modules=$(cat "$GUEST_OUT/kvmhost/modules-dir")
# The emulator: guest/build.sh unpacks a pinned QEMU for it (guest/out/kvmhost/qemu-dir; why: there).
qemu_dir=$(cat "$GUEST_OUT/kvmhost/qemu-dir" 2>/dev/null || true)
qemu_firmware=()
if [ -n "${KVMSHARP_L1_QEMU:-}" ]; then qemu=$KVMSHARP_L1_QEMU
elif [ -x "$qemu_dir/usr/bin/qemu-system-x86_64" ]; then qemu=$qemu_dir/usr/bin/qemu-system-x86_64; qemu_firmware=(-L "$qemu_dir/usr/share/qemu")
else qemu=qemu-system-x86_64
fi
command -v "$qemu" >/dev/null || { echo "kvm-host: $qemu is missing (guest/build.sh --only kvmhost unpacks it)" >&2; exit 125; }
# The L1 binds the unpacked package's modules over /lib/modules of the shared tree, which needs the
# directory to exist; Debian without an installed kernel (these machines) has none.
[ -d /lib/modules ] || mkdir -p /lib/modules

job=$(mktemp -d "${TMPDIR:-/tmp}/kvmhost.XXXXXX")
qpid= saved_tty=
cleanup() {
    [ -n "$qpid" ] && kill -KILL "$qpid" 2>/dev/null
    [ -n "$saved_tty" ] && stty "$saved_tty" 2>/dev/null    # QEMU puts the terminal in raw mode
    rm -rf "$job"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The command's script: the caller's environment (less what only makes sense out here), the same
# working directory, then CMD itself.
{
    echo '#!/bin/bash'
    export -p | grep -Ev '^declare -x (OLDPWD|PWD|SHLVL|_|TMPDIR|TMP|TEMP|DISPLAY|SSH_[A-Z_]*|DBUS_[A-Z_]*|XDG_RUNTIME_DIR)(=|$)'
    # TMPDIR on the L1's tmpfs: the .NET runtime, vstest and the tests make sockets/FIFOs there.
    echo 'export TMPDIR=/run/tmp DOTNET_EnableDiagnostics=0 MSBUILDDISABLENODEREUSE=1 DOTNET_CLI_USE_MSBUILD_SERVER=0 KVMSHARP_IN_NESTED_HOST=1'
    [ -t 0 ] && [ -t 1 ] || echo 'export TERM=dumb'   # ttyS0 is a terminal in there: no escape codes for a pipe
    printf 'cd -- %q || exit 126\n' "$PWD"
    printf 'exec'; printf ' %q' "$@"; echo
} > "$job/cmd.sh"

cpus=${KVMSHARP_L1_CPUS:-$(nproc)}
mem=${KVMSHARP_L1_MEMORY:-12G}
tcg_thread=${KVMSHARP_L1_TCG_THREAD:-multi}
append="console=ttyS1 panic=-1 loglevel=4 kvmhost.job=$job kvmhost.modules=$modules"
[ -n "${KVMSHARP_L1_APPEND:-}" ] && append+=" $KVMSHARP_L1_APPEND"
signal=on
if [ -t 0 ] && [ -t 1 ]; then                     # interactive: Ctrl-C goes to the guest
    append+=" kvmhost.tty=1"; signal=off; saved_tty=$(stty -g)
fi

note "no usable /dev/kvm here: running in a nested KVM host (QEMU TCG, emulated AMD-V, ${cpus} vCPUs, ${mem}); slower than hardware"
# -no-reboot: the L1's `reboot -f` (done, or panic=-1) ends QEMU. The i6300esb watchdog powers a
# hung L1 off. MTTCG: one host thread per vCPU.
set +e
# QEMU runs in the background so that a TERM to this script can kill it; a background job's stdin
# would be /dev/null, so the terminal (interactive) is handed over as fd 4.
if [ "$signal" = off ]; then exec 4<&0; else exec 4</dev/null; fi
timeout --foreground -k 10 "$timeout_s" \
    "$qemu" "${qemu_firmware[@]}" -accel "tcg,thread=$tcg_thread" -cpu max -smp "$cpus" -m "$mem" -M pc \
        -nodefaults -no-user-config -display none -no-reboot \
        -kernel "$kernel" -initrd "$initrd" -append "$append" \
        -chardev stdio,id=io,signal=$signal -serial chardev:io \
        -serial "file:$job/console.log" \
        -virtfs local,path=/,mount_tag=host,security_model=passthrough,id=host0,multidevs=remap \
        -device i6300esb -watchdog-action poweroff \
        <&4 2> "$job/qemu.err" &
qpid=$!
wait "$qpid"; qrc=$?
qpid=
set -e

if [ -s "$job/rc" ]; then
    exit "$(cat "$job/rc")"
fi
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    echo "kvm-host: the nested KVM host was killed after ${timeout_s} s (timeout); its last console lines:" >&2; rc=124
else
    why=$(grep -ahE 'kvmhost-init: FAILED|Kernel panic|watchdog|BUG:' "$job/console.log" 2>/dev/null | head -1)
    echo "kvm-host: the nested KVM host failed before the command finished (QEMU exit $qrc${why:+: $why}); its last console lines:" >&2; rc=125
fi
{ tail -n 15 "$job/console.log" 2>/dev/null; cat "$job/qemu.err" 2>/dev/null; } | sed 's/^/  | /' >&2
exit $rc
