#!/usr/bin/env bash
# VMM memory overhead: RSS of the VMM process minus the resident part of its guest-RAM mapping, for
# 1 vCPU and 128 MiB, with a guest (guests/mem.S) that writes one byte to each of 4096 pages (16 MiB)
# and then halts with interrupts off (the vCPU sleeps in KVM; the process stays alive).
# /proc/PID/smaps is sampled once the guest mapping holds the 16 MiB and the total RSS has stopped
# changing; the process is then killed. The guest-RAM mapping is the 128 MiB anonymous mapping.
# Runs are interleaved (kvmsharp, qemu, refvmm, kvmsharp, ...); medians over RUNS (default 5).
# Goal (issue 2): kvmsharp overhead <= 5 MiB.
. "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-5}
build_all; find_kvmsharp; detect_qemu_cpu
[ -n "${MEM_DEBUG:-}" ] && set -x
G=$B/mem.elf
MEM_KB=$((128 * 1024)); TOUCHED_KB=$((4096 * 4))
declare -A CMD=(
    [kvmsharp]="$KS run --memory 128M --debug-exit --pvh --kernel $G"
    [qemu]="$QEMU -M microvm -m 128M -nodefaults -no-user-config -nographic -display none -kernel $G -device isa-debug-exit,iobase=0xf4,iosize=1 -accel kvm -cpu $QEMU_CPU"
    [refvmm]="$B/refvmm -m 128 -p -s $G"
)
ORDER=(kvmsharp qemu refvmm)

# prints: rss_kb guest_rss_kb private_kb guest_private_kb anon_kb  (guest = the anonymous mapping of
# MEM_KB with the largest Rss. The kernel sometimes merges the guest-RAM mapping with an adjacent
# anonymous mapping of the same protection (seen: +132 KiB, 1 resident page); mappings of up to
# MEM_KB + 8 MiB are accepted, so the guest figure can include up to that neighbour's resident pages.)
sample() {
    awk -v want="$MEM_KB" '
        /^[0-9a-f]+-[0-9a-f]+ / { anon = (NF == 5); cur = 0; next }
        /^Size:/ { size = $2; next }
        /^Rss:/ { rss += $2; cur = $2; if (anon && size >= want && size <= want + 8192 && cur >= grss) { grss = cur; gpick = 1 } else gpick = 0; next }
        /^Private_(Clean|Dirty):/ { priv += $2; if (gpick) gpriv += $2; next }
        /^Anonymous:/ { an += $2; next }
        END { printf "%d %d %d %d %d\n", rss, grss, priv, gpriv, an }' "/proc/$1/smaps"
}

measure() {  # $1 = name; prints the sample line, or nothing if the guest never got its pages resident
    local pid s="" prev="" i ok=""
    ${CMD[$1]} </dev/null >/dev/null 2>>"$B/memory-$1.err" &
    pid=$!
    for i in $(seq 150); do          # up to 30 s
        sleep 0.2
        kill -0 "$pid" 2>/dev/null || break
        s=$(sample "$pid" 2>/dev/null) || { prev=""; continue; }   # a read of smaps can fail while the process maps
        read -r rss grss _ <<<"$s"
        if [ "$grss" -ge "$TOUCHED_KB" ] && [ "$s" = "$prev" ]; then ok=1; break; fi
        prev=$s
    done
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "memory.sh: $1 (pid $pid) ignored SIGTERM for 5 s; SIGKILL" >&2
        kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    if [ -n "$ok" ]; then echo "$s"; else echo "memory.sh: $1: no stable sample (last: $s; stderr in build/memory-$1.err)" >&2; fi
}

echo "### memory overhead, 1 vCPU, 128 MiB, 16 MiB touched by the guest ($RUNS interleaved runs each)"
echo
echo "before: $(conditions)"
declare -A OUT
rm -f "$B"/memory-*.err
for r in $(seq "$RUNS"); do
    for name in "${ORDER[@]}"; do
        OUT[$name]+="$(measure "$name")"$'\n'
    done
done
echo "after:  load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| VMM | RSS MiB | guest-RAM Rss MiB | **overhead MiB** (RSS − guest) | of it file-backed (binary, libs) | of it anonymous (heap, stacks, runtime) | private overhead MiB | runs |"
echo "|---|---|---|---|---|---|---|---|"
for name in "${ORDER[@]}"; do
    data=$(printf '%s' "${OUT[$name]}" | sed '/^$/d')
    n=$(wc -l <<<"$data")
    rss=$(awk '{print $1/1024}' <<<"$data" | median)
    g=$(awk '{print $2/1024}' <<<"$data" | median)
    ov=$(awk '{print ($1-$2)/1024}' <<<"$data" | median)
    pov=$(awk '{print ($3-$4)/1024}' <<<"$data" | median)
    fb=$(awk '{print ($1-$5)/1024}' <<<"$data" | median)
    an=$(awk '{print ($5-$2)/1024}' <<<"$data" | median)
    case $name in
        kvmsharp) label="kvmsharp run --pvh" ;;
        qemu) label="qemu microvm -accel kvm" ;;
        refvmm) label="refvmm -p -s (bare C, no irqchip)" ;;
    esac
    printf '| %s | %.1f | %.1f | **%.2f** | %.2f | %.2f | %.2f | %d |\n' "$label" "$rss" "$g" "$ov" "$fb" "$an" "$pov" "$n"
done
echo
echo "raw (rss guest_rss private guest_private anonymous, KiB):"
for name in "${ORDER[@]}"; do printf '%s\n' "${OUT[$name]}" | sed '/^$/d' | sed "s/^/    $name: /"; done
