#!/usr/bin/env bash
# Benchmarks `kvmsharp img bench`/`convert` against `qemu-img bench`/`convert` on the same images,
# same machine, same run, alternating the two tools; prints a markdown table of medians and ratios.
#
#   bench/images/run.sh [WORKDIR] [RUNS]
#
# KVMSHARP_IMG: command for our tool (default: the ImgHost in this folder, built Release), e.g.
#   KVMSHARP_IMG="/path/to/kvmsharp img" bench/images/run.sh
# Both tools use the page cache (qemu-img bench's default cache=writeback; -t none is not implemented
# by us). qemu-img bench keeps 64 requests in flight (-d 64); ours issues them one at a time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/kvmsharp-bench-images}"
runs="${2:-5}"
size_mib="${BENCH_SIZE_MIB:-1024}"
convert_gib="${BENCH_CONVERT_GIB:-2}"
command -v qemu-img >/dev/null || { echo "qemu-img missing: apt-get install -y qemu-utils" >&2; exit 1; }
if [[ -z "${KVMSHARP_IMG:-}" ]]; then
  dotnet build -c Release -o "$work/host" "$here/ImgHost" >/dev/null
  KVMSHARP_IMG="$work/host/ImgHost"
fi
mkdir -p "$work"
cd "$work"
ours() { $KVMSHARP_IMG "$@"; }
secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }
results="$work/results.tsv"
: > "$results"

# A full image: every cluster allocated (written by qemu-img itself).
rm -f full.qcow2
qemu-img create -q -f qcow2 full.qcow2 "${size_mib}M"
qemu-img bench -q -w -c $((size_mib * 16)) -s 65536 --pattern=90 full.qcow2 >/dev/null

# Random = a large step that scatters requests (qemu-img bench has no random mode); steps keep 4 KiB or
# 64 KiB alignment, so no request crosses the end of the image with QEMU 7.2's wrap rule.
R4=389124096    # 95001 * 4096
R64=389152768   # 5938 * 65536
cases=(
  "read-seq-4k|full|-c 50000 -s 4096"
  "read-seq-64k|full|-c 8000 -s 65536"
  "read-rand-4k|full|-c 50000 -s 4096 -S $R4"
  "read-rand-64k|full|-c 8000 -s 65536 -S $R64"
  "write-seq-4k-overlay|overlay|-w -c 50000 -s 4096"
  "write-seq-64k-overlay|overlay|-w -c 8000 -s 65536"
  "write-rand-4k-overlay|overlay|-w -c 20000 -s 4096 -S $R4"
  "write-rand-64k-overlay|overlay|-w -c 8000 -s 65536 -S $R64"
  "write-seq-4k-full|full|-w -c 50000 -s 4096"
  "write-seq-64k-full|full|-w -c 8000 -s 65536"
  "write-rand-4k-full|full|-w -c 50000 -s 4096 -S $R4"
  "write-rand-64k-full|full|-w -c 8000 -s 65536 -S $R64"
)
for c in "${cases[@]}"; do
  IFS='|' read -r name target args <<<"$c"
  for ((i = 0; i < runs; i++)); do
    for tool in qemu ours; do
      img=full.qcow2
      if [[ $target == overlay ]]; then
        rm -f ovl.qcow2
        qemu-img create -q -f qcow2 -b full.qcow2 -F qcow2 ovl.qcow2
        img=ovl.qcow2
      fi
      # shellcheck disable=SC2086
      if [[ $tool == qemu ]]; then t=$(qemu-img bench $args "$img" | secs); else t=$(ours bench $args "$img" | secs); fi
      printf '%s\t%s\t%s\n' "$name" "$tool" "$t" >> "$results"
    done
  done
done

# convert of a multi-GiB image: 3/4 random data, 1/4 zeros, as a qcow2 made by qemu-img.
if [[ ! -f conv-src.qcow2 ]]; then
  head -c $((convert_gib * 768))M /dev/urandom > conv-src.raw
  truncate -s "${convert_gib}G" conv-src.raw
  qemu-img convert -O qcow2 conv-src.raw conv-src.qcow2
  rm -f conv-src.raw
fi
for fmt in qcow2 raw; do
  for ((i = 0; i < runs; i++)); do
    for tool in qemu ours; do
      rm -f conv-out.img
      s=$(date +%s.%N)
      if [[ $tool == qemu ]]; then qemu-img convert -O $fmt conv-src.qcow2 conv-out.img; else ours convert -O $fmt conv-src.qcow2 conv-out.img; fi
      e=$(date +%s.%N)
      printf '%s\t%s\t%s\n' "convert-${convert_gib}g-to-$fmt" "$tool" "$(echo "$e - $s" | bc)" >> "$results"
      if [[ $i == 0 && $tool == ours ]]; then qemu-img compare -q conv-src.qcow2 conv-out.img || { echo "convert output differs" >&2; exit 1; }; fi
    done
  done
done
rm -f conv-out.img ovl.qcow2

python3 - "$results" <<'PY'
import sys, statistics, collections
d = collections.defaultdict(lambda: collections.defaultdict(list))
order = []
for line in open(sys.argv[1]):
    name, tool, t = line.split('\t')
    if name not in order: order.append(name)
    d[name][tool].append(float(t))
print("| case | qemu-img median s | kvmsharp median s | throughput ratio (qemu time / ours) |")
print("|---|---:|---:|---:|")
for n in order:
    q = statistics.median(d[n]['qemu']); o = statistics.median(d[n]['ours'])
    print(f"| {n} | {q:.3f} | {o:.3f} | {q/o:.2f}x |")
PY
