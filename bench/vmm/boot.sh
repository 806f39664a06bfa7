#!/usr/bin/env bash
# Boot-to-init, kvmsharp and QEMU/KVM side by side: wall time from starting the VMM to the
# `KVMSHARP-READY` line that guest/init prints on the serial console once user space runs, for the
# test guests built by guest/build.sh:
#   minimal   guest/out/minimal/bzImage + guest/out/initrd.cpio
#   distro    guest/out/distro/vmlinuz  + guest/out/distro/initrd.cpio
# Both VMMs get the same kernel, initramfs, command line, RAM and vCPUs:
#   kvmsharp run --cpus CPUS --memory MEM --kernel K --initrd I --cmdline CMDLINE
#   qemu-system-x86_64 -M QEMU_MACHINE -accel kvm -cpu QEMU_CPU -m MEM -smp CPUS -kernel K -initrd I
#       -append CMDLINE -nographic -no-reboot -nodefaults -no-user-config -serial stdio
# RUNS boots of each, interleaved (kvmsharp, qemu, qemu, kvmsharp, ...: who goes first alternates);
# medians. The guest runs `true` and powers off (ACPI S5 on both).
# Usage: boot.sh [minimal] [distro]     (default: both that exist)
#   RUNS (default 3), CPUS (1), MEM (512M), TIMEOUT (s per boot: 900, distro 2400),
#   QEMU_MACHINE (default microvm: its default acpi=auto gives both kernels ACPI and the ISA serial
#   port; no firmware but qboot, no PCI), QEMU_CPU (lib.sh). QEMU=none: kvmsharp only.
# Every console line is time-stamped into build/boot-<guest>-<vmm>-<n>.log ("seconds-since-start line").
. "$(dirname "$0")/lib.sh"
build_all; find_kvmsharp
RUNS=${RUNS:-3}; CPUS=${CPUS:-1}; MEM=${MEM:-512M}; QEMU_MACHINE=${QEMU_MACHINE:-microvm}
[ "$QEMU" = none ] || detect_qemu_cpu
CMDLINE="console=ttyS0 reboot=k panic=1 nokaslr i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp no_timer_check tsc=reliable random.trust_cpu=on mitigations=off nowatchdog cryptomgr.notests kvmsharp.run=$(printf true | base64) kvmsharp.exit=poweroff"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    [ -f "$ROOT/guest/out/minimal/bzImage" ] && targets+=(minimal)
    [ -f "$ROOT/guest/out/distro/vmlinuz" ] && targets+=(distro)
fi

# run_timed LOG TIMEOUT CMD...: runs CMD with stdin /dev/null, time-stamps its output lines into LOG,
# sets RC (exit status; 124 = timeout) and ELAPSED (seconds)
run_timed() {
    local log=$1 to=$2; shift 2
    local t0=${EPOCHREALTIME/./} line now
    set +e
    # (in a subshell, so that bash does not report a VMM that aborts, e.g. QEMU's assertion)
    (timeout -s TERM -k 10 "$to" "$@" </dev/null 2>&1; exit $?) 2>/dev/null | while IFS= read -r line || [ -n "$line" ]; do
        now=${EPOCHREALTIME/./}
        printf '%d.%06d %s\n' $(((now - t0) / 1000000)) $(((now - t0) % 1000000)) "${line//$'\r'/}"
    done >"$log"
    RC=${PIPESTATUS[0]}
    set -e
    local t1=${EPOCHREALTIME/./}
    ELAPSED=$(awk -v d=$((t1 - t0)) 'BEGIN{printf "%.2f", d/1e6}')
}
# time of the first line containing $2, or "never"
at() { awk -v p="$2" 'index($0, p) {print $1; f=1; exit} END {if (!f) print "never"}' "$1"; }
# median of the numbers among the arguments (ignores "never"), "–" if none
med() { local m; m=$(printf '%s\n' "$@" | grep -E '^[0-9.]+$' | median); [ "$m" = nan ] && echo "–" || printf '%.1f' "$m"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a+0 > 0 && b+0 > 0) printf "%.2f", a/b; else print "–" }'; }
last_line() { grep -v '^[0-9.]* *$' "$1" | tail -n 1 | cut -d' ' -f2- | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1b[=>]//g' | tr -cd '[:print:]' | tr '|' '/' | cut -c1-90; }

echo "### boot to init, kvmsharp and QEMU/KVM side by side ($RUNS interleaved boots each, $CPUS vCPU, $MEM)"
echo
echo "before: $(conditions)"
echo "command line (both): \`$CMDLINE\`"
echo "kvmsharp: \`kvmsharp run --cpus $CPUS --memory $MEM --kernel K --initrd I --cmdline CMDLINE\`"
[ "$QEMU" = none ] || echo "QEMU: \`$QEMU -M $QEMU_MACHINE -accel kvm -cpu $QEMU_CPU -m $MEM -smp $CPUS -kernel K -initrd I -append CMDLINE -nographic -no-reboot -nodefaults -no-user-config -serial stdio\`"
echo
declare -A READY LINUX INIT END
PER_RUN=""
boot_one() {  # vmm name kernel initrd timeout run
    local vmm=$1 name=$2 kernel=$3 initrd=$4 to=$5 r=$6 log
    log=$B/boot-$name-$vmm-$r.log
    if [ "$vmm" = kvmsharp ]; then
        run_timed "$log" "$to" $KS run --cpus "$CPUS" --memory "$MEM" --kernel "$ROOT/$kernel" --initrd "$ROOT/$initrd" --cmdline "$CMDLINE"
    else
        run_timed "$log" "$to" $QEMU -M "$QEMU_MACHINE" -accel kvm -cpu "$QEMU_CPU" -m "$MEM" -smp "$CPUS" \
            -kernel "$ROOT/$kernel" -initrd "$ROOT/$initrd" -append "$CMDLINE" \
            -nographic -no-reboot -nodefaults -no-user-config -serial stdio
    fi
    local rd li ri
    rd=$(at "$log" KVMSHARP-READY); li=$(at "$log" 'Linux version'); ri=$(at "$log" 'Run /init')
    READY[$name-$vmm]+=" $rd"; LINUX[$name-$vmm]+=" $li"; INIT[$name-$vmm]+=" $ri"
    # a boot that never got to user space, or ended badly, does not count as an ended process
    [ "$rd" != never ] && [ "$RC" = 0 ] && END[$name-$vmm]+=" $ELAPSED"
    PER_RUN+="| $name #$r | $vmm | $li | $ri | **$rd** | $ELAPSED | $RC$([ "$RC" = 124 ] && echo ' = timeout') | $(last_line "$log") |"$'\n'
    echo "boot.sh: $name #$r $vmm: READY at $rd s, ended after $ELAPSED s, exit $RC (load $(cut -d' ' -f1 /proc/loadavg))" >&2
}
for t in "${targets[@]}"; do
    case $t in
        minimal) kernel=guest/out/minimal/bzImage initrd=guest/out/initrd.cpio to=${TIMEOUT:-900} ;;
        distro)  kernel=guest/out/distro/vmlinuz initrd=guest/out/distro/initrd.cpio to=${TIMEOUT:-2400} ;;
        qemu) echo "boot.sh: 'qemu' is no longer a target: every target now also boots under QEMU/KVM" >&2; continue ;;
        *) echo "unknown target $t (minimal|distro)" >&2; exit 2 ;;
    esac
    if [ ! -f "$ROOT/$kernel" ] || [ ! -f "$ROOT/$initrd" ]; then
        echo "$t: not measured: $kernel or $initrd does not exist (guest/build.sh)"; echo; continue
    fi
    for r in $(seq "$RUNS"); do
        order=(kvmsharp qemu); [ $((r % 2)) = 0 ] && order=(qemu kvmsharp)
        for vmm in "${order[@]}"; do
            [ "$vmm" = qemu ] && [ "$QEMU" = none ] && continue
            boot_one "$vmm" "$t" "$kernel" "$initrd" "$to" "$r"
        done
    done
done
echo "after:  $(conditions)"
echo
echo "| guest | VMM | 'Linux version' s | 'Run /init' s | **KVMSHARP-READY s** | process ended s (poweroff) | boots reaching READY | **READY ÷ QEMU's** |"
echo "|---|---|---|---|---|---|---|---|"
for t in "${targets[@]}"; do
    [ -n "${READY[$t-kvmsharp]:-}" ] || continue
    qr=$(med ${READY[$t-qemu]:-})
    for vmm in kvmsharp qemu; do
        [ -n "${READY[$t-$vmm]:-}" ] || continue
        # shellcheck disable=SC2086
        ok=$(printf '%s\n' ${READY[$t-$vmm]} | grep -cv never || true); n=$(wc -w <<<"${READY[$t-$vmm]}")
        label=$([ $vmm = kvmsharp ] && echo "kvmsharp run" || echo "qemu -M $QEMU_MACHINE -accel kvm -cpu $QEMU_CPU")
        # shellcheck disable=SC2086
        printf '| %s | %s | %s | %s | **%s** | %s | %s of %s | %s |\n' "$t" "$label" \
            "$(med ${LINUX[$t-$vmm]})" "$(med ${INIT[$t-$vmm]})" "$(med ${READY[$t-$vmm]})" "$(med ${END[$t-$vmm]:-})" \
            "$ok" "$n" "$(ratio "$(med ${READY[$t-$vmm]})" "$qr")"
    done
done
echo
echo "Medians; ratio of the medians. Per boot, in the order run:"
echo
echo "| guest, run | VMM | 'Linux version' s | 'Run /init' s | KVMSHARP-READY s | ended s | exit status | last console line |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s' "$PER_RUN"
echo
echo "console logs with time stamps: bench/vmm/build/boot-<guest>-<vmm>-<n>.log"
