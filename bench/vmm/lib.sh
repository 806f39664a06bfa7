# Common set-up for the bench/vmm scripts (sourced). Builds the tiny guests, the bare C reference VMM
# and the timing harness into bench/vmm/build/, and finds the VMMs.
#   KVMSHARP  the kvmsharp command (default: out/kvmsharp; falls back to the JIT build's dll)
#   QEMU      qemu-system-x86_64
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/../.." && pwd)
B=$BENCH/build
mkdir -p "$B"

# Only what is out of date is rebuilt: inside the nested KVM host gcc runs emulated (seconds each).
build_all() {
    local g
    newer() { local t=$1 f; shift; [ -e "$t" ] || return 1; for f; do [ "$t" -nt "$f" ] || return 1; done; }
    for g in tiny mem exits; do
        newer "$B/$g.elf" "$BENCH/guests/$g.S" "$BENCH/guests/guest.ld" "$BENCH/guests/pvhnote.inc" && continue
        gcc -c -o "$B/$g.o" "$BENCH/guests/$g.S"
        ld --no-warn-rwx-segments -nostdlib -static -z max-page-size=4096 -T "$BENCH/guests/guest.ld" -o "$B/$g.elf" "$B/$g.o"
    done
    # the per-exit guest without its port-0x80 loop: start-up + ring-0 set-up + iretq + exit only
    if ! newer "$B/exits0.elf" "$BENCH/guests/exits.S" "$BENCH/guests/guest.ld" "$BENCH/guests/pvhnote.inc"; then
        gcc -DCOUNT=0 -c -o "$B/exits0.o" "$BENCH/guests/exits.S"
        ld --no-warn-rwx-segments -nostdlib -static -z max-page-size=4096 -T "$BENCH/guests/guest.ld" -o "$B/exits0.elf" "$B/exits0.o"
    fi
    newer "$B/refvmm" "$BENCH/refvmm.c" || gcc -O2 -Wall -o "$B/refvmm" "$BENCH/refvmm.c"
    newer "$B/interleave" "$BENCH/interleave.c" || gcc -O2 -Wall -o "$B/interleave" "$BENCH/interleave.c"
}

# KvmSharp: a private copy of out/kvmsharp, so that a rebuild by someone else during the run does not
# change (or remove) the binary under test.
# KVMSHARP naming an executable file (e.g. another worktree's out/kvmsharp) is copied the same way.
find_kvmsharp() {
    local src=""
    if [ -n "${KVMSHARP:-}" ] && [ -f "$KVMSHARP" ] && [ -x "$KVMSHARP" ]; then
        src=$KVMSHARP; KS_KIND="KVMSHARP=$KVMSHARP (copied to build/)"
    elif [ -n "${KVMSHARP:-}" ]; then
        KS=$KVMSHARP; KS_KIND="KVMSHARP=$KVMSHARP"; return
    elif [ -x "$ROOT/out/kvmsharp" ]; then
        src=$ROOT/out/kvmsharp; KS_KIND="out/kvmsharp (NativeAOT, copied to build/)"
    fi
    if [ -n "$src" ]; then
        if ! cmp -s "$src" "$B/kvmsharp"; then   # rename, not overwrite: it may be running
            cp "$src" "$B/kvmsharp.new.$$" && mv -f "$B/kvmsharp.new.$$" "$B/kvmsharp"
        fi
        KS=$B/kvmsharp
        KS_KIND+=", sha256 $(sha256sum "$B/kvmsharp" | cut -c1-12), built $(date -u -r "$src" +%FT%TZ)"
    elif [ -f "$ROOT/src/KvmSharp.Cli/bin/Release/net10.0/kvmsharp.dll" ]; then
        KS="dotnet $ROOT/src/KvmSharp.Cli/bin/Release/net10.0/kvmsharp.dll"; KS_KIND="JIT build (dotnet kvmsharp.dll)"
    else
        echo "no kvmsharp: run scripts/build.sh" >&2; exit 2
    fi
}

QEMU=${QEMU:-qemu-system-x86_64}

# QEMU's -cpu model for -accel kvm, unless QEMU_CPU is set: plain `host` where QEMU starts with it
# (hardware KVM, the nested KVM host), else `host,-arch-capabilities` (the PVM host: there `-cpu host`
# aborts with "failed to set MSR 0x10a to 0x69", IA32_ARCH_CAPABILITIES, which kvm_pvm refuses).
# Detected once per run with the tiny guest (needs build_all first) and exported to the other scripts.
detect_qemu_cpu() {
    [ -n "${QEMU_CPU:-}" ] && return
    local c rc
    for c in host host,-arch-capabilities; do
        set +e
        timeout 120 $QEMU -M microvm -m 128M -nodefaults -no-user-config -nographic -display none -kernel "$B/tiny.elf" \
            -device isa-debug-exit,iobase=0xf4,iosize=1 -accel kvm -cpu "$c" </dev/null >"$B/qemu-cpu-$c.log" 2>&1
        rc=$?
        set -e
        if [ "$rc" = 1 ]; then QEMU_CPU=$c; export QEMU_CPU; return; fi
        echo "lib.sh: QEMU -accel kvm -cpu $c does not run the tiny guest here (exit $rc: $(tr -cd '[:print:]\n' <"$B/qemu-cpu-$c.log" | head -2 | tr '\n' ' '))" >&2
    done
    QEMU_CPU=host; export QEMU_CPU
    echo "lib.sh: no QEMU CPU model worked; using '$QEMU_CPU' (its rows will fail)" >&2
}

# The KVM in use: kvm_amd/kvm_intel (hardware or the nested KVM host, scripts/kvm-host.sh) or kvm_pvm.
kvm_kind() {
    local m
    for m in kvm_pvm kvm_amd kvm_intel; do [ -d /sys/module/$m ] && [ -c /dev/kvm ] && { echo $m; return; }; done
    echo kvm
}
where() {
    if [ "${KVMSHARP_IN_NESTED_HOST:-}" = 1 ]; then
        echo "nested KVM host (scripts/kvm-host.sh: QEMU TCG, emulated AMD-V, $(nproc) vCPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)) on a machine with ${BENCH_OUTER_CPUS:-?} CPUs, outer load average ${BENCH_OUTER_LOAD:-unknown} at the start of the run"
    else
        echo "$(nproc) CPUs"
    fi
}

conditions() {
    echo "host: $(uname -r), $(where), kvm module: $(kvm_kind)," \
         "load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
    local tree
    tree=$(git -C "$(dirname "${KVMSHARP:-$ROOT/out/kvmsharp}")" rev-parse --show-toplevel 2>/dev/null || echo "$ROOT")
    echo "kvmsharp: $KS_KIND, its tree $tree at commit $(git -C "$tree" rev-parse --short HEAD 2>/dev/null)$(git -C "$tree" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted src changes') (now; the binary may be older); bench scripts at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null);" \
         "$($QEMU --version | head -1)"
}

# median of numbers on stdin
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
