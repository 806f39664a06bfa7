#!/usr/bin/env bash
# Runs every VMM benchmark and prints the markdown sections (also saved to
# bench/vmm/build/results-<UTC time>.md). The distro-kernel boot only with --distro.
# Knobs: see each script (ROUNDS, WARMUP, RUNS, CPUS, MEM, NO_TCG, TIMEOUT, QEMU_CPU, QEMU_MACHINE, KVMSHARP).
#   bench/vmm/run-all.sh [--distro] [--no-boot]
# Without a usable /dev/kvm here, the whole run goes into one nested KVM host (scripts/kvm-host.sh;
# KVM_HOST_SH names another copy of it), so that kvmsharp and QEMU/KVM are compared in the same L1;
# the load average of this machine is printed before and after.
set -euo pipefail
D=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$D/../.." && pwd)
boot=(minimal)
for a in "$@"; do
    case $a in
        --distro) boot+=(distro) ;;
        --no-boot) boot=() ;;
        *) echo "usage: $0 [--distro] [--no-boot]" >&2; exit 2 ;;
    esac
done
mkdir -p "$D/build"
if [ "${KVMSHARP_IN_NESTED_HOST:-}" != 1 ] && [ "$("${KVM_HOST_SH:-$ROOT/scripts/kvm-host.sh}" --where)" = nested ]; then
    # build the helpers out here (gcc in there is emulated), then run everything in one L1
    (. "$D/lib.sh"; build_all; find_kvmsharp)
    echo "run-all.sh: no usable /dev/kvm here: running in a nested KVM host; this machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)" >&2
    export BENCH_OUTER_LOAD BENCH_OUTER_CPUS
    BENCH_OUTER_LOAD=$(cut -d' ' -f1-3 /proc/loadavg) BENCH_OUTER_CPUS=$(nproc)
    set +e
    "${KVM_HOST_SH:-$ROOT/scripts/kvm-host.sh}" -- "$D/run-all.sh" "$@"
    rc=$?
    set -e
    echo "run-all.sh: nested KVM host done (exit $rc); this machine: load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)" >&2
    exit $rc
fi
out=$D/build/results-$(date -u +%Y%m%dT%H%M%SZ).md
# the QEMU CPU model once for all scripts (lib.sh: `host` where it works)
. "$D/lib.sh"
build_all; find_kvmsharp; detect_qemu_cpu
{
    echo "QEMU CPU model for -accel kvm: $QEMU_CPU$([ -n "${BENCH_OUTER_LOAD:-}" ] && echo "; this machine's load average at the start: $BENCH_OUTER_LOAD")"
    echo
    "$D/startup.sh"; echo
    "$D/memory.sh"; echo
    "$D/exits.sh"; echo
    if [ ${#boot[@]} -gt 0 ]; then "$D/boot.sh" "${boot[@]}"; fi
} 2>&1 | tee "$out"
echo "(saved to $out)"
