#!/usr/bin/env bash
# Runs every VMM benchmark of issue 2 and prints the markdown sections (also saved to
# bench/vmm/build/results-<UTC time>.md). The distro-kernel boot (~10+ minutes on a PVM host) only
# with --distro. Knobs: see each script (ROUNDS, WARMUP, RUNS, NO_TCG, TIMEOUT, TIMEOUT_QEMU, KVMSHARP).
#   bench/vmm/run-all.sh [--distro] [--no-boot]
set -euo pipefail
D=$(cd "$(dirname "$0")" && pwd)
boot=(minimal qemu)
for a in "$@"; do
    case $a in
        --distro) boot+=(distro) ;;
        --no-boot) boot=() ;;
        *) echo "usage: $0 [--distro] [--no-boot]" >&2; exit 2 ;;
    esac
done
mkdir -p "$D/build"
out=$D/build/results-$(date -u +%Y%m%dT%H%M%SZ).md
{
    "$D/startup.sh"; echo
    "$D/memory.sh"; echo
    "$D/exits.sh"; echo
    if [ ${#boot[@]} -gt 0 ]; then "$D/boot.sh" "${boot[@]}"; fi
} 2>&1 | tee "$out"
echo "(saved to $out)"
