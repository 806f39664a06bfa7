#!/usr/bin/env bash
# Boot-to-init: wall time from starting the VMM to the `KVMSHARP-READY` line that guest/init prints on
# the serial console once user space runs, for the test guests built by guest/build.sh:
#   minimal   guest/out/minimal/bzImage + guest/out/initrd.cpio
#   distro    guest/out/distro/vmlinuz  + guest/out/distro/initrd.cpio   (~10+ minutes on a PVM host)
#   qemu      the minimal guest under qemu-system-x86_64 -accel kvm (default machine, -cpu host and
#             -cpu host,-arch-capabilities), TIMEOUT_QEMU (default 300 s) each: does it boot here?
# Usage: boot.sh [minimal] [distro] [qemu]     (default: minimal qemu; distro only when asked)
# Every console line is time-stamped into build/boot-<name>.log ("seconds-since-start line").
#   RUNS (default 1) boots of each kvmsharp guest; TIMEOUT (default 900 s, distro 2400 s).
. "$(dirname "$0")/lib.sh"
find_kvmsharp
RUNS=${RUNS:-1}
CMDLINE="console=ttyS0 reboot=k panic=1 nokaslr i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp no_timer_check tsc=reliable random.trust_cpu=on mitigations=off nowatchdog cryptomgr.notests kvmsharp.run=$(printf true | base64) kvmsharp.exit=reboot"
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(minimal qemu)

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

echo "### boot to init"
echo
echo "before: $(conditions)"
echo "command line: \`$CMDLINE\`"
echo
header_done=""
kvm_row() {  # name kernel initrd timeout
    local name=$1 kernel=$2 initrd=$3 to=$4 r
    if [ ! -f "$ROOT/$kernel" ] || [ ! -f "$ROOT/$initrd" ]; then
        echo "| kvmsharp, $name | $kernel | not measured: $kernel or $initrd does not exist (guest/build.sh) | | | | |"; return
    fi
    for r in $(seq "$RUNS"); do
        local log=$B/boot-$name-$r.log
        run_timed "$log" "$to" $KS run --cpus 1 --memory 512M --kernel "$ROOT/$kernel" --initrd "$ROOT/$initrd" --cmdline "$CMDLINE"
        printf '| kvmsharp, %s | `%s` | **%s** | %s | %s | %s | %s (%s) |\n' "$name" "$kernel" \
            "$(at "$log" KVMSHARP-READY)" "$(at "$log" 'Linux version')" "$(at "$log" 'Run /init')" \
            "$ELAPSED" "$RC" "$(tail -n 1 "$log" | cut -d' ' -f2- | tr -cd '[:print:]' | tr '|' '/' | cut -c1-100)"
    done
}
qemu_row() {  # cpu
    local cpu=$1 log=$B/boot-qemu-${1//[^a-z]/_}.log to=${TIMEOUT_QEMU:-300}
    if [ ! -f "$ROOT/guest/out/minimal/bzImage" ]; then
        echo "| qemu -cpu $cpu | minimal | not measured: guest/out/minimal/bzImage does not exist | | | | |"; return
    fi
    run_timed "$log" "$to" $QEMU -accel kvm -cpu "$cpu" -m 512M -nographic -no-reboot \
        -kernel "$ROOT/guest/out/minimal/bzImage" -initrd "$ROOT/guest/out/initrd.cpio" -append "$CMDLINE"
    local last
    last=$(grep -v '^[0-9.]* *$' "$log" | tail -n 2 | cut -d' ' -f2- | tr '\n' ' ' | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' | tr -cd '[:print:]' | tr '|' '/' | cut -c1-200)
    printf '| qemu -accel kvm -cpu %s | `guest/out/minimal/bzImage` | %s | %s | %s | %s | %s (%s) |\n' "$cpu" \
        "$(at "$log" KVMSHARP-READY)" "$(at "$log" 'Linux version')" "$(at "$log" 'Run /init')" \
        "$ELAPSED" "$RC$([ "$RC" = 124 ] && echo ' = timeout')" "$last"
}
echo "| VMM, guest | kernel | **KVMSHARP-READY s** | 'Linux version' s | 'Run /init' s | process ended s | exit status (last console line) |"
echo "|---|---|---|---|---|---|---|"
for t in "${targets[@]}"; do
    case $t in
        minimal) kvm_row minimal guest/out/minimal/bzImage guest/out/initrd.cpio "${TIMEOUT:-900}" ;;
        distro)  kvm_row distro guest/out/distro/vmlinuz guest/out/distro/initrd.cpio "${TIMEOUT:-2400}" ;;
        qemu)    qemu_row host; qemu_row host,-arch-capabilities ;;
        *) echo "unknown target $t" >&2; exit 2 ;;
    esac
done
echo
echo "after: load average $(cut -d' ' -f1-3 /proc/loadavg); console logs with time stamps: bench/vmm/build/boot-*.log"
