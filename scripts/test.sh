#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install prerequisites, build the test guests (cached
# under /var/cache/kvmsharp, pinned by version) and kvmsharp, then run every test tier:
#   unit tests (no KVM) → tiny hand-assembled guests on KVM → real boots of the minimal guest.
# `scripts/test.sh --slow` adds the distro-kernel boots (11–25 minutes each on a PVM host).
# Ends with one line: "N passed, N failed, N skipped".
set -uo pipefail
cd "$(dirname "$0")/.."

SLOW=0
for a in "$@"; do
  case "$a" in
    --slow) SLOW=1 ;;
    *) echo "usage: scripts/test.sh [--slow]" >&2; exit 2 ;;
  esac
done

set -e
scripts/setup.sh
guest_targets=(--only initrd --only minimal)
[ "$SLOW" = 1 ] && guest_targets+=(--only distro)
guest/build.sh "${guest_targets[@]}"
scripts/build.sh
set +e

export KVMSHARP_BIN="$PWD/out/kvmsharp"
export KVMSHARP_GUEST_DIR="$PWD/guest/out"
export KVMSHARP_SLOW=$SLOW

passed=0 failed=0 skipped=0
log=$(mktemp)
for proj in \
  tests/KvmSharp.Memory.Tests \
  tests/KvmSharp.Devices.Tests \
  tests/KvmSharp.Boot.Tests \
  tests/KvmSharp.Images.Tests \
  tests/KvmSharp.Kvm.Tests \
  tests/KvmSharp.IntegrationTests; do
  [ -d "$proj" ] || continue
  if ! ls "$proj"/*.cs >/dev/null 2>&1; then continue; fi
  echo "=== $proj" >&2
  dotnet test "$proj" -c Release --nologo -v quiet 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  summary=$(grep -E "(Passed|Failed)!? +- +Failed: +[0-9]+, Passed: +[0-9]+, Skipped: +[0-9]+" "$log" | tail -n 1)
  if [ -n "$summary" ]; then
    f=$(sed -E 's/.*Failed: +([0-9]+),.*/\1/' <<<"$summary")
    p=$(sed -E 's/.*Passed: +([0-9]+),.*/\1/' <<<"$summary")
    s=$(sed -E 's/.*Skipped: +([0-9]+),.*/\1/' <<<"$summary")
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
  elif [ "$rc" != 0 ]; then
    echo "$proj: build or test host failed (exit $rc)" >&2
    failed=$((failed + 1))
  fi
done
rm -f "$log"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
