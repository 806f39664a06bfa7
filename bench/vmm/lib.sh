# Common set-up for the bench/vmm scripts (sourced). Builds the tiny guests, the bare C reference VMM
# and the timing harness into bench/vmm/build/, and finds the VMMs.
#   KVMSHARP  the kvmsharp command (default: out/kvmsharp; falls back to the JIT build's dll)
#   QEMU      qemu-system-x86_64
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/../.." && pwd)
B=$BENCH/build
mkdir -p "$B"

build_all() {
    local g
    for g in tiny mem exits; do
        gcc -c -o "$B/$g.o" "$BENCH/guests/$g.S"
        ld --no-warn-rwx-segments -nostdlib -static -z max-page-size=4096 -T "$BENCH/guests/guest.ld" -o "$B/$g.elf" "$B/$g.o"
    done
    # the per-exit guest without its port-0x80 loop: start-up + ring-0 set-up + iretq + exit only
    gcc -DCOUNT=0 -c -o "$B/exits0.o" "$BENCH/guests/exits.S"
    ld --no-warn-rwx-segments -nostdlib -static -z max-page-size=4096 -T "$BENCH/guests/guest.ld" -o "$B/exits0.elf" "$B/exits0.o"
    gcc -O2 -Wall -o "$B/refvmm" "$BENCH/refvmm.c"
    gcc -O2 -Wall -o "$B/interleave" "$BENCH/interleave.c"
}

# KvmSharp: a private copy of out/kvmsharp, so that a rebuild by someone else during the run does not
# change (or remove) the binary under test.
find_kvmsharp() {
    if [ -n "${KVMSHARP:-}" ]; then
        KS=$KVMSHARP; KS_KIND="KVMSHARP=$KVMSHARP"
    elif [ -x "$ROOT/out/kvmsharp" ]; then
        if ! cmp -s "$ROOT/out/kvmsharp" "$B/kvmsharp"; then   # rename, not overwrite: it may be running
            cp "$ROOT/out/kvmsharp" "$B/kvmsharp.new.$$" && mv -f "$B/kvmsharp.new.$$" "$B/kvmsharp"
        fi
        KS=$B/kvmsharp; KS_KIND="out/kvmsharp (NativeAOT, copied to build/)"
    elif [ -f "$ROOT/src/KvmSharp.Cli/bin/Release/net10.0/kvmsharp.dll" ]; then
        KS="dotnet $ROOT/src/KvmSharp.Cli/bin/Release/net10.0/kvmsharp.dll"; KS_KIND="JIT build (dotnet kvmsharp.dll)"
    else
        echo "no kvmsharp: run scripts/build.sh" >&2; exit 2
    fi
}

QEMU=${QEMU:-qemu-system-x86_64}
# -cpu host aborts on this PVM host ("failed to set MSR 0x10a to 0x69", IA32_ARCH_CAPABILITIES);
# without that one feature QEMU runs under KVM.
QEMU_CPU=${QEMU_CPU:-host,-arch-capabilities}

conditions() {
    echo "host: $(uname -r), $(nproc) CPUs, kvm module: $( [ -d /sys/module/kvm_pvm ] && echo kvm_pvm || echo kvm)," \
         "load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
    echo "kvmsharp: $KS_KIND, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted src changes');" \
         "$($QEMU --version | head -1)"
}

# median of numbers on stdin
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
