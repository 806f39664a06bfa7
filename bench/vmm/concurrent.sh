#!/usr/bin/env bash
# concurrent.sh — ROUNDS rounds of four Debian distro-kernel guests (1 vCPU, 256 MiB, the command line of
# tests/KvmSharp.IntegrationTests/DistroBootTests) started together, alternating kvmsharp rounds and
# QEMU/KVM rounds; counts the guests that reach the end of their command. Used on 2026-12-03 to tell the
# nested host's failures from kvmsharp's (guest/README.md, issue 8). Run where /dev/kvm works:
#   scripts/kvm-host.sh --timeout 3000 -- bench/vmm/concurrent.sh [both|kvmsharp|qemu]
# ROUNDS (3), OUT (bench/vmm/build/concurrent), KVMSHARP (out/kvmsharp), GUESTS (4), TIMEOUT (1200 s per round).
set -u
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}; MODE=${1:-both}; O=${OUT:-bench/vmm/build/concurrent}; KS=${KVMSHARP:-out/kvmsharp}
GUESTS=${GUESTS:-4}; TO=${TIMEOUT:-1200}
mkdir -p "$O"
S='echo "cpus=$(grep -c ^processor /proc/cpuinfo)"; echo "sum=$(seq 1 20000 | sha256sum | cut -c1-64)"'
RUN=$(printf '%s' "$S" | base64 -w0)
CMD="console=ttyS0 reboot=k panic=1 nokaslr i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp no_timer_check tsc=reliable random.trust_cpu=on mitigations=off nowatchdog cryptomgr.notests sysctl.kernel.hung_task_timeout_secs=0 rcupdate.rcu_cpu_stall_suppress=1 earlyprintk=ttyS0 kvmsharp.run=$RUN kvmsharp.exit=poweroff"
K=guest/out/distro/vmlinuz; I=guest/out/distro/initrd.cpio
for r in $(seq 1 "$ROUNDS"); do
  for v in kvmsharp qemu; do
    [ "$MODE" != both ] && [ "$MODE" != $v ] && continue
    t0=$(date +%s); pids=()
    for g in $(seq 0 $((GUESTS - 1))); do
      if [ $v = kvmsharp ]; then
        timeout "$TO" "$KS" run --kernel $K --initrd $I --cpus 1 --memory 256M --cmdline "$CMD" </dev/null >"$O/$v-$r-$g.log" 2>&1 &
      else
        timeout "$TO" qemu-system-x86_64 -M microvm,acpi=on -accel kvm -cpu host -m 256M -smp 1 -kernel $K -initrd $I \
          -append "$CMD" -nographic -no-reboot -nodefaults -no-user-config -serial stdio </dev/null >"$O/$v-$r-$g.log" 2>&1 &
      fi
      pids+=($!)
    done
    codes=""; for p in "${pids[@]}"; do wait "$p"; codes="$codes $?"; done
    ok=$(grep -l "KVMSHARP-END rc=0" "$O/$v-$r-"*.log | wc -l)
    echo "round $r $v: exit codes [$codes ] reached the end: $ok/$GUESTS in $(( $(date +%s) - t0 )) s" | tee -a "$O/summary"
  done
done
