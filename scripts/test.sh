#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install prerequisites, build the test guests (cached
# under /var/cache/kvmsharp, pinned by version) and kvmsharp, then run every test tier:
#   unit tests (no KVM) → tiny hand-assembled guests on KVM → real boots (minimal and distro kernel).
# The KVM tiers run where /dev/kvm is usable: directly, or inside the nested KVM host that
# scripts/kvm-host.sh starts when this machine has none (KVMSHARP_KVM_HOST forces one or the other).
# Ends with one line: "N passed, N failed, N skipped".
#
#   scripts/test.sh            everything
#   scripts/test.sh --unit     the tiers that need no KVM
#   scripts/test.sh --kvm      the KVM tiers only
set -uo pipefail
cd "$(dirname "$0")/.."

tiers=all
for a in "$@"; do
  case "$a" in
    --unit) tiers=unit ;;
    --kvm) tiers=kvm ;;
    *) echo "usage: scripts/test.sh [--unit|--kvm]" >&2; exit 2 ;;
  esac
done
UNIT=(KvmSharp.Memory.Tests KvmSharp.Devices.Tests KvmSharp.Boot.Tests KvmSharp.Images.Tests KvmSharp.Cli.Tests KvmSharp.Vmm.Tests KvmSharp.Architecture.Tests)
KVM=(KvmSharp.Kvm.Tests KvmSharp.IntegrationTests)
t_start=$(date +%s)
stamp() { echo "[test.sh] $(( $(date +%s) - t_start )) s: $*" >&2; }

set -e
stamp "setup"
scripts/setup.sh
kvm_where=$(scripts/kvm-host.sh --where)
guest_targets=(--only initrd --only minimal --only distro)
[ "$kvm_where" = nested ] && guest_targets+=(--only kvmhost)
stamp "guests"
guest/build.sh "${guest_targets[@]}"
stamp "kvmsharp"
scripts/build.sh
stamp "test projects"
dotnet build KvmSharp.slnx -c Release -nologo -v quiet
set +e

export KVMSHARP_BIN="$PWD/out/kvmsharp"
export KVMSHARP_GUEST_DIR="$PWD/guest/out"

passed=0 failed=0 skipped=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Add one xunit v3 run's "Total: T, Errors: E, Failed: F, Skipped: S, Not Run: N" to the counts;
# a project with no summary line (crash, build error, the nested host failed) counts as one failure.
count() { # project exit-status
  local line t e f s n
  line=$(grep -aE "^ +$1 +Total: [0-9]+, Errors: [0-9]+, Failed: [0-9]+, Skipped: [0-9]+, Not Run: [0-9]+" "$log" | tail -n 1)
  if [ -z "$line" ]; then
    echo "$1: no test summary (exit $2)" >&2; failed=$((failed + 1)); return
  fi
  read -r t e f s n < <(sed -E 's/.*Total: ([0-9]+), Errors: ([0-9]+), Failed: ([0-9]+), Skipped: ([0-9]+), Not Run: ([0-9]+).*/\1 \2 \3 \4 \5/' <<<"$line")
  passed=$((passed + t - f - s - n)); failed=$((failed + f + e + n)); skipped=$((skipped + s))
}
exe() { echo "tests/$1/bin/Release/net10.0/$1"; }

if [ "$tiers" != kvm ]; then
  for p in "${UNIT[@]}"; do
    stamp "$p"
    "$(exe "$p")" -noColor 2>&1 | tee "$log"
    count "$p" "${PIPESTATUS[0]}"
  done
fi

# Add a script's plain "N passed, N failed" line to the counts (none: one failure).
count_plain() { # name
  local line f
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
  if [ -n "$line" ]; then
    passed=$((passed + ${line%% passed*})); f=${line#*, }; failed=$((failed + ${f%% failed}))
  else
    echo "$1: no summary" >&2; failed=$((failed + 1))
  fi
}

if [ "$tiers" != kvm ]; then
  # Each fuzz target for a short time box over its committed corpus (fuzz/README.md); a crash fails.
  stamp "fuzz targets, ${KVMSHARP_FUZZ_SECONDS:-30} s each"
  scripts/fuzz.sh --ci "${KVMSHARP_FUZZ_SECONDS:-30}" 2>&1 | tee "$log"
  count_plain scripts/fuzz.sh
fi

if [ "$tiers" != unit ] && [ "$kvm_where" = nested ]; then
  stamp "the nested KVM host itself"
  scripts/test-kvm-host.sh 2>&1 | tee "$log"
  count_plain scripts/test-kvm-host.sh
fi

if [ "$tiers" != unit ]; then
  # One nested host for both KVM tiers: it boots in ~10 s, the .NET runtime in it is emulated.
  stamp "KVM tiers ($kvm_where)"
  cmd=""
  for p in "${KVM[@]}"; do cmd+="$(exe "$p") -noColor; "; done
  scripts/kvm-host.sh --timeout "${KVMSHARP_KVM_TIMEOUT:-3600}" -- bash -c "$cmd" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  for p in "${KVM[@]}"; do count "$p" "$rc"; done
fi
stamp "done"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
