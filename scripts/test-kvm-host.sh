#!/usr/bin/env bash
# Checks of scripts/kvm-host.sh's nested KVM host itself (run by scripts/test.sh where /dev/kvm is
# missing): the command's output, exit status, working directory and environment come back; a hung
# L1 is killed at the timeout and a panicking one is reported, each in one line with its console;
# nothing is left behind. Ends with "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
export KVMSHARP_KVM_HOST=nested
passed=0 failed=0
check() { # name condition-status
    if [ "$2" = 0 ]; then passed=$((passed + 1)); echo "PASS $1"; else failed=$((failed + 1)); echo "FAIL $1"; fi
}
# A private TMPDIR: kvm-host.sh makes its job directories there, so leftovers are ours to see.
export TMPDIR=$(mktemp -d)

out=$(KVMSHARP_PROBE=from-host scripts/kvm-host.sh --quiet -- bash -c 'echo "cwd=$PWD probe=$KVMSHARP_PROBE"; test -c /dev/kvm && echo kvm-ok; echo out; echo err >&2; exit 7' 2>&1); rc=$?
echo "$out" | sed 's/^/  | /'
[ "$rc" = 7 ] && grep -qx "cwd=$PWD probe=from-host" <<<"$out" && grep -qx kvm-ok <<<"$out" && grep -qx err <<<"$out"
check "exit status, cwd, environment, /dev/kvm and stderr come back" $?

t0=$(date +%s)
err=$(scripts/kvm-host.sh --timeout 45 -- sleep 600 2>&1 >/dev/null); rc=$?; t=$(( $(date +%s) - t0 ))
echo "$err" | head -3 | sed 's/^/  | /'
[ "$rc" = 124 ] && [ "$t" -lt 80 ] && grep -q "killed after 45 s (timeout)" <<<"$err"
check "a command that outlives --timeout ends the L1: exit 124 after ${t} s, one line" $?

err=$(scripts/kvm-host.sh -- sh -c 'echo c > /proc/sysrq-trigger; sleep 600' 2>&1 >/dev/null); rc=$?
echo "$err" | head -2 | sed 's/^/  | /'
[ "$rc" = 125 ] && grep -q "failed before the command finished.*Kernel panic" <<<"$err"
check "an L1 kernel panic: exit 125, one line naming it, then its console" $?

left=$(ls -A "$TMPDIR")
[ -z "$left" ] && ! pgrep -f "kvmhost.job=$TMPDIR/" >/dev/null
check "no job directory or QEMU left behind${left:+ (left: $left)}" $?
rmdir "$TMPDIR"

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
