#!/usr/bin/env bash
# Per-exit cost: a guest (guests/exits.S) switches itself to ring 3 (own page tables with U/S, own GDT,
# iretq with IOPL = 3) and writes port 0x80 COUNT = 100,000 times — each write a KVM_EXIT_IO to user
# space that the VMM ignores (KvmSharp claims port 0x80 as Linux's io_delay port) — then writes 0 to
# the isa-debug-exit port 0xf4. The same ELF runs under `kvmsharp run` (64-bit ELF entry) and under
# refvmm (bare C KVM_RUN loop, same boot state). A second build with COUNT = 0 measures everything
# else (process start, ring-0 set-up, exit), so
#     µs per exit = (median wall(100k) − median wall(0)) / 100,000.
# Runs are interleaved round-robin. Goal (issue 2): kvmsharp <= 1.05x refvmm.
#   ROUNDS (default 7), WARMUP (default 1), RUN_TIMEOUT (s per run, default 600: a hung run is killed
#   and counted as failed)
. "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-7}; WARMUP=${WARMUP:-1}; COUNT=100000
build_all; find_kvmsharp
echo "### per-exit cost: $COUNT ring-3 port writes ($ROUNDS interleaved rounds after $WARMUP warm-up)"
echo
echo "before: $(conditions)"
res=$("$B/interleave" -r "$ROUNDS" -w "$WARMUP" -x 1 -t "${RUN_TIMEOUT:-600}" -o "$B/exits.raw" -- \
    kvmsharp-100k "$KS run --memory 128M --debug-exit --kernel $B/exits.elf" \
    refvmm-100k   "$B/refvmm -m 128 $B/exits.elf" \
    kvmsharp-0    "$KS run --memory 128M --debug-exit --kernel $B/exits0.elf" \
    refvmm-0      "$B/refvmm -m 128 $B/exits0.elf")
echo "after:  load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
get() { awk -v l="$1" -v c="$2" -F'\t' '$1==l {print $c}' <<<"$res"; }
# per-round paired difference (same round, status 1 only) as a cross-check of the difference of medians
paired() { awk -v a="$1-100k" -v b="$1-0" '$4==1 && $2==a {x[$1]=$3} $4==1 && $2==b {y[$1]=$3}
    END {for (r in x) if (r in y) print (x[r]-y[r])/1e3/'"$COUNT"'}' "$B/exits.raw" | median; }
echo "| VMM | wall, 100k exits (median ms, IQR) | wall, 0 exits (median ms) | **µs per exit** (wall) | µs/exit, median of per-round differences | CPU µs per exit (user+sys) | runs ok (failed) 100k / 0 |"
echo "|---|---|---|---|---|---|---|"
declare -A PER CPU
for v in kvmsharp refvmm; do
    m1=$(get "$v-100k" 4); m0=$(get "$v-0" 4)
    PER[$v]=$(awk -v a="$m1" -v b="$m0" -v n=$COUNT 'BEGIN{printf "%.2f", (a-b)*1000/n}')
    CPU[$v]=$(awk -v a="$(get "$v-100k" 9)" -v b="$(get "$v-0" 9)" -v n=$COUNT 'BEGIN{printf "%.2f", (a-b)*1000/n}')
    printf '| %s | %.0f (%.0f–%.0f) | %.1f | **%s** | %.2f | %s | %s (%s) / %s (%s) |\n' \
        "$([ $v = kvmsharp ] && echo "kvmsharp run" || echo "refvmm (C KVM_RUN loop)")" \
        "$m1" "$(get "$v-100k" 5)" "$(get "$v-100k" 6)" "$m0" "${PER[$v]}" "$(paired $v)" "${CPU[$v]}" \
        "$(get "$v-100k" 2)" "$(get "$v-100k" 3)" "$(get "$v-0" 2)" "$(get "$v-0" 3)"
done
echo
echo "ratio kvmsharp / refvmm per exit, wall: **$(awk -v a="${PER[kvmsharp]}" -v b="${PER[refvmm]}" 'BEGIN{printf "%.3f", a/b}')** (goal <= 1.05);" \
     "CPU time: $(awk -v a="${CPU[kvmsharp]}" -v b="${CPU[refvmm]}" 'BEGIN{printf "%.3f", a/b}')"
echo
echo "raw samples: bench/vmm/build/exits.raw"
