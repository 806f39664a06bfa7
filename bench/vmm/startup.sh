#!/usr/bin/env bash
# Start-up benchmark: wall time of the whole VMM process, from exec to exit, for a guest whose first
# instructions write to the isa-debug-exit port (guests/tiny.S). Compared, interleaved round-robin:
#   kvmsharp run --pvh   (PVH entry, 32-bit protected mode — what QEMU does with a PVH ELF)
#   kvmsharp run         (the ELF's 64-bit entry)
#   refvmm -p / refvmm   (bare C VMM with raw ioctls, same two entry modes — the limit)
#   refvmm -i -p / -i    (the same plus in-kernel irqchip and PIT, which KvmSharp and QEMU create)
#   qemu-system-x86_64 -M microvm -accel kvm   (and -accel tcg, for information)
# Goal (issue 2): kvmsharp <= 0.3x QEMU and <= 1.5x the C program.
#   ROUNDS (default 30), WARMUP (default 3), RUN_TIMEOUT (s, default 120: a hung run is killed and
#   counted as failed), NO_TCG=1 to skip the QEMU TCG row (default inside the
#   nested KVM host, where TCG inside an emulated machine says nothing; NO_TCG=0 forces it).
. "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-30}; WARMUP=${WARMUP:-3}
build_all; find_kvmsharp; detect_qemu_cpu
G=$B/tiny.elf
QEMU_COMMON="$QEMU -M microvm -m 128M -nodefaults -no-user-config -nographic -display none -kernel $G -device isa-debug-exit,iobase=0xf4,iosize=1"
cmds=(
    kvmsharp-pvh "$KS run --memory 128M --debug-exit --pvh --kernel $G"
    kvmsharp-64  "$KS run --memory 128M --debug-exit --kernel $G"
    refvmm-pvh   "$B/refvmm -m 128 -p $G"
    refvmm-64    "$B/refvmm -m 128 $G"
    refvmm-i-pvh "$B/refvmm -m 128 -i -p $G"
    refvmm-i-64  "$B/refvmm -m 128 -i $G"
    qemu-kvm     "$QEMU_COMMON -accel kvm -cpu $QEMU_CPU"
)
[ "${KVMSHARP_IN_NESTED_HOST:-}" = 1 ] && NO_TCG=${NO_TCG:-1}
[ "${NO_TCG:-}" = 1 ] || cmds+=(qemu-tcg "$QEMU_COMMON -accel tcg")

echo "### start-up ($ROUNDS interleaved rounds after $WARMUP warm-up rounds)"
echo
echo "before: $(conditions)"
res=$("$B/interleave" -r "$ROUNDS" -w "$WARMUP" -x 1 -t "${RUN_TIMEOUT:-120}" -o "$B/startup.raw" -- "${cmds[@]}")
echo "after:  load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
get() { awk -v l="$1" -F'\t' '$1==l {print $4}' <<<"$res"; }
q=$(get qemu-kvm)
echo "| process | entry | median ms | IQR ms | CPU ms (user+sys, median) | runs ok (failed) | ÷ QEMU-KVM | ÷ refvmm, same entry | ÷ refvmm -i, same entry |"
echo "|---|---|---|---|---|---|---|---|---|"
while IFS=$'\t' read -r label n failed med q1 q3 min max cpu; do
    case $label in
        kvmsharp-pvh) name="kvmsharp run --pvh"; entry="PVH 32-bit"; ref=$(get refvmm-pvh); refi=$(get refvmm-i-pvh) ;;
        kvmsharp-64)  name="kvmsharp run"; entry="ELF 64-bit"; ref=$(get refvmm-64); refi=$(get refvmm-i-64) ;;
        refvmm-pvh)   name="refvmm -p (C, raw ioctls)"; entry="PVH 32-bit"; ref=$med; refi=$(get refvmm-i-pvh) ;;
        refvmm-64)    name="refvmm (C, raw ioctls)"; entry="ELF 64-bit"; ref=$med; refi=$(get refvmm-i-64) ;;
        refvmm-i-pvh) name="refvmm -i -p (C, + irqchip, PIT)"; entry="PVH 32-bit"; ref=$(get refvmm-pvh); refi=$med ;;
        refvmm-i-64)  name="refvmm -i (C, + irqchip, PIT)"; entry="ELF 64-bit"; ref=$(get refvmm-64); refi=$med ;;
        qemu-kvm)     name="qemu microvm -accel kvm -cpu $QEMU_CPU"; entry="PVH (via qboot)"; ref=""; refi="" ;;
        qemu-tcg)     name="qemu microvm -accel tcg (not KVM; for information)"; entry="PVH (via qboot)"; ref=""; refi="" ;;
    esac
    rq=$(awk -v a="$med" -v b="$q" 'BEGIN{printf "%.3f", a/b}')
    rr=$([ -n "$ref" ] && awk -v a="$med" -v b="$ref" 'BEGIN{printf "%.2f", a/b}' || echo "–")
    ri=$([ -n "$refi" ] && awk -v a="$med" -v b="$refi" 'BEGIN{printf "%.2f", a/b}' || echo "–")
    printf '| %s | %s | %.1f | %.1f–%.1f | %.1f | %s (%s) | %s | %s | %s |\n' "$name" "$entry" "$med" "$q1" "$q3" "$cpu" "$n" "$failed" "$rq" "$rr" "$ri"
done <<<"$res"
echo
echo "raw samples: bench/vmm/build/startup.raw"
