#!/usr/bin/env bash
# Build the KvmSharp test guests from pinned Debian 12 packages. See guest/README.md.
#
#   guest/build.sh                  build (or refresh from the cache) everything into guest/out/
#   guest/build.sh --only initrd    just one output: minimal | distro | initrd | kvmhost (repeatable)
#   guest/build.sh --check          say whether guest/out/ is up to date; exit 1 if not
#
# Environment: KVMSHARP_CACHE (default /var/cache/kvmsharp), JOBS (default nproc),
#              NICE (default 10).
# Building needs root (apt-get) on Debian 12 "bookworm" amd64 with its apt sources reachable.
set -euo pipefail

# ---- pins ------------------------------------------------------------------------------
LINUX_SOURCE_PKG=linux-source-6.1
LINUX_SOURCE_VERSION=6.1.192-2
LINUX_IMAGE_PKG=linux-image-6.1.0-56-amd64        # built from the same 6.1.192-2 source
LINUX_IMAGE_VERSION=6.1.192-2
BUSYBOX_PKG=busybox-static
BUSYBOX_VERSION=1:1.35.0-4+deb12u1+b1
# The emulator that runs the nested KVM host (scripts/kvm-host.sh), not the reference QEMU: bookworm's
# QEMU 7.2 TCG loses L2 guests when several run at once (2026-12-03, four at a time: a guest of
# kvmsharp triple-faulted at its first instruction and a guest of QEMU/KVM hung, 2 of 24 guests; 0 of
# 24 with this 10.0 from bookworm-backports, same L1, same load; guest/README.md). Unpacked into the
# cache, never installed: the system's qemu-system-x86 and qemu-utils stay bookworm's.
L1_QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data)
L1_QEMU_VERSION=1:10.0.2+ds-2+deb13u1~bpo12+1
L1_QEMU_SUITE=bookworm-backports
BUILD_DEPS=(build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils kmod binutils)

# Bump a recipe string when the way an output is made changes (it is part of the cache key).
RECIPE_MINIMAL=1
RECIPE_INITRD=2
RECIPE_DISTRO=3
RECIPE_KVMHOST=2

# Distro-kernel modules for the initramfs (dependencies are added from modules.dep).
# Not crc32c_intel: it uses the SSE4.2 crc32 instruction, which PVM's emulator cannot run
# in ring 0; ext4 finds crc32c_generic instead.
DISTRO_MODULES=(virtio_pci virtio_blk virtio_net virtio_rng virtio_console virtio_balloon
                vmw_vsock_virtio_transport crc32c_generic ext4)

# Modules of the nested KVM host's initramfs (guest/kvmhost-init): KVM on the emulated AMD-V CPU,
# the host's tree over virtio-9p, the i6300esb watchdog that ends a hung L1, and TUN for the
# network tests.
KVMHOST_MODULES=(kvm_amd 9p 9pnet_virtio virtio_pci i6300esb tun)

# Options the minimal kernel's final .config must have (checked after olddefconfig).
MINIMAL_REQUIRED_Y=(64BIT SMP PVH PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD
  DEVTMPFS DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS BINFMT_ELF BINFMT_SCRIPT PCI PCI_MSI ACPI
  VIRTIO_PCI VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_NET HW_RANDOM_VIRTIO
  VIRTIO_CONSOLE VIRTIO_BALLOON EXT4_FS NET INET PACKET UNIX SERIO_I8042 KEYBOARD_ATKBD
  RTC_DRV_CMOS HZ_100 NO_HZ_IDLE KVM_GUEST PARAVIRT HYPERVISOR_GUEST X86_X2APIC X86_MPPARSE
  KERNEL_GZIP MAGIC_SYSRQ CRYPTO_CRC32C SLAB INIT_STACK_NONE)
MINIMAL_REQUIRED_OFF=(MODULES FTRACE FUNCTION_TRACER KPROBES DEBUG_WX RANDOMIZE_BASE
  CRYPTO_CRC32C_INTEL CRYPTO_AES_NI_INTEL RAID6_PQ XOR_BLOCKS SOUND USB_SUPPORT DRM WLAN
  WIRELESS NFS_FS SCHED_DEBUG DEBUG_INFO LOCKDEP KASAN UBSAN STACKPROTECTOR
  PAGE_TABLE_ISOLATION RETPOLINE)

# ---- paths -----------------------------------------------------------------------------
GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$GUEST_DIR/out
CACHE=${KVMSHARP_CACHE:-/var/cache/kvmsharp}
JOBS=${JOBS:-$(nproc)}
NICE=${NICE:-10}
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

log()  { printf '[guest/build] %s\n' "$*" >&2; }
die()  { printf '[guest/build] ERROR: %s\n' "$*" >&2; exit 1; }
run()  { log "+ $*"; "$@"; }
sha()  { sha256sum | cut -c1-16; }

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

CHECK=0
ONLY=()
while [ $# -gt 0 ]; do
    case "$1" in
        --check) CHECK=1 ;;
        --only) [ $# -ge 2 ] || die "--only needs an argument"; ONLY+=("$2"); shift ;;
        --only=*) ONLY+=("${1#--only=}") ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
[ ${#ONLY[@]} -gt 0 ] || ONLY=(initrd minimal distro kvmhost)
for t in "${ONLY[@]}"; do
    case "$t" in minimal|distro|initrd|kvmhost) ;; *) die "--only: unknown output '$t' (minimal|distro|initrd|kvmhost)" ;; esac
done
wanted() { local t; for t in "${ONLY[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }

# ---- cache keys (from pins + committed inputs only; no apt or network needed) ------------
key_initrd()  { { echo "$RECIPE_INITRD $BUSYBOX_PKG=$BUSYBOX_VERSION"; cat "$GUEST_DIR/init"; } | sha; }
key_minimal() { { echo "$RECIPE_MINIMAL $LINUX_SOURCE_PKG=$LINUX_SOURCE_VERSION";
                  printf '%s\n' "${MINIMAL_REQUIRED_Y[@]}" "${MINIMAL_REQUIRED_OFF[@]}";
                  cat "$GUEST_DIR/minimal.config"; } | sha; }
key_distro()  { { echo "$RECIPE_DISTRO $LINUX_IMAGE_PKG=$LINUX_IMAGE_VERSION";
                  echo "$BUSYBOX_PKG=$BUSYBOX_VERSION ${DISTRO_MODULES[*]}";
                  cat "$GUEST_DIR/init"; } | sha; }
key_kvmhost() { { echo "$RECIPE_KVMHOST $LINUX_IMAGE_PKG=$LINUX_IMAGE_VERSION";
                  echo "$BUSYBOX_PKG=$BUSYBOX_VERSION ${KVMHOST_MODULES[*]} $CACHE";
                  echo "${L1_QEMU_PKGS[*]}=$L1_QEMU_VERSION";
                  cat "$GUEST_DIR/kvmhost-init"; } | sha; }

files_initrd=(initrd.cpio)
files_minimal=(minimal/vmlinux minimal/bzImage minimal/config minimal/System.map)
files_distro=(distro/vmlinuz distro/initrd.cpio distro/config distro/modules.txt)
files_kvmhost=(kvmhost/vmlinuz kvmhost/initrd.cpio kvmhost/modules-dir kvmhost/qemu-dir)

# out/<what>.key holds the key the files in out/ came from.
up_to_date() { # what key
    local f arr="files_$1[@]"
    [ "$(cat "$OUT/.$1.key" 2>/dev/null)" = "$2" ] || return 1
    for f in "${!arr}"; do [ -s "$OUT/$f" ] || return 1; done
    # kvmhost's *-dir files point into the cache, which may have been cleaned since
    if [ "$1" = kvmhost ]; then
        [ -d "$(cat "$OUT/kvmhost/modules-dir")" ] && [ -x "$(cat "$OUT/kvmhost/qemu-dir")/usr/bin/qemu-system-x86_64" ] || return 1
    fi
}

if [ "$CHECK" = 1 ]; then
    stale=0
    for t in "${ONLY[@]}"; do
        k=$(key_"$t")
        if up_to_date "$t" "$k"; then
            echo "$t: up to date (key $k)"
        elif [ -f "$CACHE/$t/$k/DONE" ]; then
            echo "$t: stale in guest/out, but built in the cache ($CACHE/$t/$k): rerun build.sh to copy"; stale=1
        else
            echo "$t: needs building (key $k)"; stale=1
        fi
    done
    exit $stale
fi

mkdir -p "$OUT"

# Building (as opposed to copying from the cache) needs root for apt and the cache directory,
# and one build at a time per cache (the kernel's object tree is shared).
NEED_ROOT_DONE=0
need_root() {
    [ "$NEED_ROOT_DONE" = 1 ] && return 0
    [ "$(id -u)" = 0 ] || die "building needs root (apt-get install/download; writes $CACHE)"
    [ "$(dpkg --print-architecture)" = amd64 ] || die "amd64 only"
    mkdir -p "$CACHE"/{debs,src,build}
    exec 9> "$CACHE/.lock"
    if ! flock -n 9; then
        log "waiting for another guest/build.sh using $CACHE ..."
        flock 9
    fi
    NEED_ROOT_DONE=1
}

# Copy a finished cache dir's files into out/ and record the key.
publish() { # what key
    local f arr="files_$1[@]" src="$CACHE/$1/$2"
    for f in "${!arr}"; do
        mkdir -p "$(dirname "$OUT/$f")"
        cp -f "$src/$(basename "$f")" "$OUT/$f.tmp"
        mv -f "$OUT/$f.tmp" "$OUT/$f"
    done
    echo "$2" > "$OUT/.$1.key"
    log "$1: guest/out/ <- $src"
}

# ---- apt helpers -------------------------------------------------------------------------
APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    run apt-get update -q -o DPkg::Lock::Timeout=600 >&2
    APT_UPDATED=1
}
# apt knows pkg=version? If not, update the lists once and ask again.
apt_has() {
    apt-cache show "$1=$2" >/dev/null 2>&1 && return 0
    apt_update_once
    apt-cache show "$1=$2" >/dev/null 2>&1
}
# Adds $L1_QEMU_SUITE to apt's sources (once). Backports are "NotAutomatic": nothing installed
# changes, packages come from there only when asked for by version.
ensure_l1_suite() {
    local list=/etc/apt/sources.list.d/kvmsharp-$L1_QEMU_SUITE.list
    grep -rqs "$L1_QEMU_SUITE" /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
    log "+ apt source $L1_QEMU_SUITE -> $list"
    echo "deb http://deb.debian.org/debian $L1_QEMU_SUITE main" > "$list"
    APT_UPDATED=0
    apt_update_once
}
ensure_build_deps() {
    local p missing=()
    for p in "${BUILD_DEPS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    apt_update_once
    run apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >&2
}
# Download pkg=version into the cache (once); print the .deb's path. No installation.
fetch_deb() { # pkg version
    local deb="$CACHE/debs/$1_${2//:/%3a}.deb" tmp
    if [ ! -s "$deb" ]; then
        apt_has "$1" "$2" || die "apt does not offer $1=$2 (pins in guest/build.sh are out of date? 'apt-cache policy $1')"
        tmp=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
        chmod 755 "$tmp"
        chown _apt "$tmp" 2>/dev/null || true    # lets apt download sandboxed (as _apt)
        log "+ apt-get download $1=$2"
        (cd "$tmp" && apt-get download -q "$1=$2" >&2)
        mv -f "$tmp"/*.deb "$deb"
        rm -rf "$tmp"
    fi
    [ "$(dpkg-deb -f "$deb" Package)" = "$1" ] && [ "$(dpkg-deb -f "$deb" Version)" = "$2" ] \
        || die "$deb is not $1=$2"
    echo "$deb"
}
# Unpack a .deb into the cache (once); print the directory.
unpack_deb() { # pkg version
    local dir="$CACHE/src/$1_${2//:/_}" deb
    if [ ! -f "$dir/.unpacked" ]; then
        deb=$(fetch_deb "$1" "$2")
        rm -rf "$dir"; mkdir -p "$dir"
        run dpkg-deb -x "$deb" "$dir"
        touch "$dir/.unpacked"
    fi
    echo "$dir"
}

# ---- initramfs -----------------------------------------------------------------------------
# Stage the busybox initramfs tree in $1 (extra files may be added by the caller).
stage_busybox_root() { # dir
    local root=$1 bb
    bb=$(unpack_deb "$BUSYBOX_PKG" "$BUSYBOX_VERSION")/bin/busybox
    [ -x "$bb" ] || die "no bin/busybox in $BUSYBOX_PKG"
    rm -rf "$root"
    mkdir -p "$root"/{bin,dev,etc,proc,sys,tmp,run,mnt,root,lib}
    chmod 1777 "$root/tmp"
    cp "$bb" "$root/bin/busybox"
    # Only /bin/sh: busybox's shell finds its applets itself (standalone mode), and so do
    # xargs, find -exec, timeout, setsid... (prefer-applets); no symlink per applet needed.
    ln -s busybox "$root/bin/sh"
    install -m 0755 "$GUEST_DIR/init" "$root/init"
    # The kernel opens /dev/console for init before anything is mounted.
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
    printf '%s\n' 'proc /proc proc defaults 0 0' 'sysfs /sys sysfs defaults 0 0' \
        'devtmpfs /dev devtmpfs defaults 0 0' > "$root/etc/fstab"
}
# Pack a staged tree into an uncompressed newc cpio, reproducibly (sorted, owner 0, fixed mtime).
pack_cpio() { # dir out.cpio
    find "$1" -exec touch -h -d @0 {} +
    (cd "$1" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0 --reproducible) > "$2.tmp"
    mv -f "$2.tmp" "$2"
}

build_initrd() {
    local key dir
    key=$(key_initrd); dir=$CACHE/initrd/$key
    if up_to_date initrd "$key"; then log "initrd: up to date ($key)"; return; fi
    [ -f "$dir/DONE" ] || need_root      # (then check again: another build may have made it)
    if [ ! -f "$dir/DONE" ]; then
        log "initrd: building $dir from $BUSYBOX_PKG=$BUSYBOX_VERSION"
        command -v cpio >/dev/null || ensure_build_deps
        rm -rf "$dir"; mkdir -p "$dir"
        stage_busybox_root "$dir/root"
        pack_cpio "$dir/root" "$dir/initrd.cpio"
        rm -rf "$dir/root"
        touch "$dir/DONE"
    fi
    publish initrd "$key"
    log "initrd: $(stat -c %s "$OUT/initrd.cpio") bytes, uncompressed newc"
}

# ---- minimal kernel ------------------------------------------------------------------------
check_minimal_config() { # .config
    local o bad=0
    for o in "${MINIMAL_REQUIRED_Y[@]}"; do
        grep -qx "CONFIG_$o=y" "$1" || { log "config: CONFIG_$o is not =y"; bad=1; }
    done
    for o in "${MINIMAL_REQUIRED_OFF[@]}"; do
        grep -q "^CONFIG_$o=" "$1" && { log "config: CONFIG_$o should be off"; bad=1; }
    done
    local n; n=$(sed -n 's/^CONFIG_NR_CPUS=//p' "$1")
    [ "${n:-0}" -ge 64 ] || { log "config: NR_CPUS=$n < 64"; bad=1; }
    # No SIMD/asm-accelerated crypto built in (PVM cannot emulate SSE/AVX/AES-NI in ring 0).
    if grep -E '^CONFIG_CRYPTO_.*(_X86_64|_INTEL|_NI|_SSSE3|_SSE2|_AVX|_AVX2|_PCLMUL|_X86)=y' "$1"; then
        log "config: SIMD crypto enabled"; bad=1
    fi
    [ $bad = 0 ] || die "minimal kernel config does not meet the requirements (see above)"
}

build_minimal() {
    local key dir src bld t0 t1
    key=$(key_minimal); dir=$CACHE/minimal/$key
    if up_to_date minimal "$key"; then log "minimal: up to date ($key)"; return; fi
    [ -f "$dir/DONE" ] || need_root      # (then check again: another build may have made it)
    if [ ! -f "$dir/DONE" ]; then
        log "minimal: building kernel $dir from $LINUX_SOURCE_PKG=$LINUX_SOURCE_VERSION"
        ensure_build_deps
        src=$CACHE/src/$LINUX_SOURCE_PKG-$LINUX_SOURCE_VERSION
        if [ ! -f "$src/.extracted" ]; then
            local pkg; pkg=$(unpack_deb "$LINUX_SOURCE_PKG" "$LINUX_SOURCE_VERSION")
            rm -rf "$src"; mkdir -p "$src"
            run tar -C "$src" --strip-components=1 -xf "$pkg/usr/src/$LINUX_SOURCE_PKG.tar.xz"
            touch "$src/.extracted"
            rm -rf "$pkg"    # the .deb stays in $CACHE/debs
        fi
        bld=$CACHE/build/minimal
        mkdir -p "$bld"
        rm -f "$bld/.config"
        run make -s -C "$src" O="$bld" ARCH=x86_64 KCONFIG_ALLCONFIG="$GUEST_DIR/minimal.config" allnoconfig
        run make -s -C "$src" O="$bld" ARCH=x86_64 olddefconfig
        check_minimal_config "$bld/.config"
        t0=$(date +%s)
        log "+ nice -n $NICE make -j$JOBS bzImage (log: $bld/build.log)"
        if ! nice -n "$NICE" make -C "$bld" ARCH=x86_64 -j"$JOBS" bzImage > "$bld/build.log" 2>&1; then
            tail -40 "$bld/build.log" >&2; die "minimal kernel build failed (full log: $bld/build.log)"
        fi
        t1=$(date +%s)
        log "minimal: kernel built in $((t1 - t0)) s with -j$JOBS"
        readelf -n "$bld/vmlinux" | grep -A1 -w Xen | grep -q '0x00000012' \
            || die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
        rm -rf "$dir"; mkdir -p "$dir"
        cp "$bld/vmlinux" "$dir/vmlinux"
        cp "$bld/arch/x86/boot/bzImage" "$dir/bzImage"
        cp "$bld/.config" "$dir/config"
        cp "$bld/System.map" "$dir/System.map"
        echo "$((t1 - t0)) s, make -j$JOBS, $(nproc) cpus, $(date -u +%FT%TZ)" > "$dir/build-time.txt"
        touch "$dir/DONE"
    fi
    publish minimal "$key"
}

# ---- distro-kernel modules into an initramfs tree ----------------------------------------------
# Copy modules (names as modprobe knows them) and their dependencies (modules.dep, depth-first:
# deps first) from the unpacked linux-image $2 into the staged tree $1, write their names in load
# order to $1/etc/modules and a modules.dep for just them.
stage_modules() { # root pkgdir module...
    local root=$1 pkg=$2 kver mdir m f name dst; shift 2
    kver=$(ls "$pkg/lib/modules")
    [ "$(echo "$kver" | wc -l)" = 1 ] || die "expected one kernel version in $pkg/lib/modules"
    mdir=$pkg/lib/modules/$kver
    [ -f "$mdir/modules.dep" ] || run depmod -b "$pkg" "$kver"
    mkdir -p "$root/lib/modules"

    # Can this kernel load compressed modules itself? Otherwise decompress them here.
    local cfg=$pkg/boot/config-$kver decompress=1
    grep -qx 'CONFIG_MODULE_DECOMPRESS=y' "$cfg" && decompress=0

    local -A seen=()
    local order=()
    resolve() { # module path relative to $mdir
        local p=$1 d
        [ -n "${seen[$p]:-}" ] && return 0
        seen[$p]=1
        for d in $(sed -n "s|^${p//./\\.}: *||p" "$mdir/modules.dep"); do resolve "$d"; done
        order+=("$p")
    }
    for m in "$@"; do
        local re=${m//[-_]/[-_]}
        if grep -Eq "/$re\.ko(\.[a-z]+)?\$" "$mdir/modules.builtin"; then
            log "$m is built into the kernel"; continue
        fi
        f=$(grep -Eo "^[^:]*/$re\.ko(\.[a-z]+)?:" "$mdir/modules.dep" | head -1 | tr -d :)
        [ -n "$f" ] || die "module $m not found in $kver"
        resolve "$f"
    done
    # Modules keep their paths under /lib/modules/<release>/; busybox modprobe loads them (with
    # dependencies) in one process.
    : > "$root/etc/modules"
    for f in "${order[@]}"; do
        name=$(basename "$f"); dst=$root/lib/modules/$kver/$f
        mkdir -p "$(dirname "$dst")"
        case "$name" in
            *.ko) cp "$mdir/$f" "$dst" ;;
            *.ko.xz)  if [ $decompress = 1 ]; then xz -dc "$mdir/$f" > "${dst%.xz}"; dst=${dst%.xz}; else cp "$mdir/$f" "$dst"; fi ;;
            *.ko.gz)  if [ $decompress = 1 ]; then gzip -dc "$mdir/$f" > "${dst%.gz}"; dst=${dst%.gz}; else cp "$mdir/$f" "$dst"; fi ;;
            *.ko.zst) if [ $decompress = 1 ]; then zstd -qdc "$mdir/$f" > "${dst%.zst}"; dst=${dst%.zst}; else cp "$mdir/$f" "$dst"; fi ;;
            *) die "unexpected module file $f" ;;
        esac
        # Drop the module signature (and debug sections): unsigned modules load with a
        # taint, signed ones make the kernel SHA-256 + RSA-verify every module, which is
        # slow in PVM's emulated ring 0 and may use SIMD there.
        case "$dst" in *.ko) strip --strip-debug "$dst" ;; esac
        name=${name%%.ko*}
        echo "${name//-/_}" >> "$root/etc/modules"
    done
    touch "$root/lib/modules/$kver"/modules.{builtin,builtin.modinfo,order}
    run depmod -b "$root" "$kver"
    # busybox modprobe reads only modules.dep; drop the rest of depmod's output.
    find "$root/lib/modules/$kver" -maxdepth 1 -type f ! -name modules.dep -delete
    log "modules in load order: $(tr '\n' ' ' < "$root/etc/modules")"
}

# ---- distro kernel + initramfs with its modules ----------------------------------------------
build_distro() {
    local key dir pkg kver root
    key=$(key_distro); dir=$CACHE/distro/$key
    if up_to_date distro "$key"; then log "distro: up to date ($key)"; return; fi
    [ -f "$dir/DONE" ] || need_root      # (then check again: another build may have made it)
    if [ ! -f "$dir/DONE" ]; then
        log "distro: building $dir from $LINUX_IMAGE_PKG=$LINUX_IMAGE_VERSION (not installed: dpkg -x)"
        command -v depmod >/dev/null && command -v cpio >/dev/null || ensure_build_deps
        pkg=$(unpack_deb "$LINUX_IMAGE_PKG" "$LINUX_IMAGE_VERSION")
        kver=$(ls "$pkg/lib/modules")
        rm -rf "$dir"; mkdir -p "$dir"
        root=$dir/root
        stage_busybox_root "$root"
        stage_modules "$root" "$pkg" "${DISTRO_MODULES[@]}"
        pack_cpio "$root" "$dir/initrd.cpio"
        cp "$root/etc/modules" "$dir/modules.txt"
        rm -rf "$root"
        cp "$pkg/boot/vmlinuz-$kver" "$dir/vmlinuz"
        cp "$pkg/boot/config-$kver" "$dir/config"
        echo "$kver" > "$dir/kernel-release"
        touch "$dir/DONE"
    fi
    publish distro "$key"
    log "distro: initrd.cpio $(stat -c %s "$OUT/distro/initrd.cpio") bytes, uncompressed newc"
}

# ---- the nested KVM host (L1) for machines without /dev/kvm -----------------------------------
# The same distro kernel, an initramfs with kvm_amd, the 9p client and the watchdog driver, whose
# init (guest/kvmhost-init) mounts the host's tree and runs one command. scripts/kvm-host.sh boots it.
build_kvmhost() {
    local key dir pkg kver root
    key=$(key_kvmhost); dir=$CACHE/kvmhost/$key
    if up_to_date kvmhost "$key"; then log "kvmhost: up to date ($key)"; return; fi
    [ -f "$dir/DONE" ] || need_root
    if [ ! -f "$dir/DONE" ]; then
        log "kvmhost: building $dir from $LINUX_IMAGE_PKG=$LINUX_IMAGE_VERSION"
        command -v depmod >/dev/null && command -v cpio >/dev/null || ensure_build_deps
        pkg=$(unpack_deb "$LINUX_IMAGE_PKG" "$LINUX_IMAGE_VERSION")
        kver=$(ls "$pkg/lib/modules")
        rm -rf "$dir"; mkdir -p "$dir"
        root=$dir/root
        stage_busybox_root "$root"
        install -m 0755 "$GUEST_DIR/kvmhost-init" "$root/init"
        stage_modules "$root" "$pkg" "${KVMHOST_MODULES[@]}"
        pack_cpio "$root" "$dir/initrd.cpio"
        rm -rf "$root"
        cp "$pkg/boot/vmlinuz-$kver" "$dir/vmlinuz"
        # The L1 binds the full module tree (tun, veth, ...) from the unpacked package in the cache.
        echo "$pkg/lib/modules" > "$dir/modules-dir"
        ensure_l1_suite
        local q deb
        mkdir -p "$dir/qemu"
        for q in "${L1_QEMU_PKGS[@]}"; do
            deb=$(fetch_deb "$q" "$L1_QEMU_VERSION")
            run dpkg-deb -x "$deb" "$dir/qemu"
        done
        "$dir/qemu/usr/bin/qemu-system-x86_64" --version >/dev/null || die "the nested host's QEMU does not run (missing libraries? ldd $dir/qemu/usr/bin/qemu-system-x86_64)"
        echo "$dir/qemu" > "$dir/qemu-dir"
        touch "$dir/DONE"
    fi
    publish kvmhost "$key"
}

wanted initrd  && build_initrd
wanted minimal && build_minimal
wanted distro  && build_distro
wanted kvmhost && build_kvmhost
log "done: $(cd "$GUEST_DIR" && ls -d out/initrd.cpio out/minimal out/distro out/kvmhost 2>/dev/null | tr '\n' ' ')"
