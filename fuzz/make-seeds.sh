#!/usr/bin/env bash
# Regenerates the seed corpus in fuzz/corpus/ (committed; run by hand, not by fuzz.sh):
# qcow2 images from qemu-img/qemu-io, xz streams from xz, payloads from the kernel build's
# compressors, and tiny ELF vmlinux / bzImage files built like tests/KvmSharp.Boot.Tests/Builders.cs.
# Needs qemu-utils, xz-utils, gzip, bzip2, zstd, lz4, python3.
set -euo pipefail
cd "$(dirname "$0")/corpus"
rm -rf qcow2 kernel xz payload
mkdir -p qcow2 kernel xz payload
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# ---- qcow2: every layout the reader knows, each a few KiB to 200 KiB.
q() { qemu-img "$@" >/dev/null; }
io() { local f=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io -f qcow2 "${a[@]}" "$f" >/dev/null; }
data=("write -P 0x11 0 4k" "write -P 0x22 1M 8k" "write -z 2M 64k")
( cd qcow2
  q create -f qcow2 -o compat=1.1,cluster_size=4096 v3-4k.qcow2 4M; io v3-4k.qcow2 "${data[@]}"
  q create -f qcow2 -o compat=0.10,cluster_size=4096 v2-4k.qcow2 4M; io v2-4k.qcow2 "write -P 0x11 0 4k" "write -P 0x22 1M 8k"
  q create -f qcow2 -o cluster_size=512 v3-512.qcow2 1M; io v3-512.qcow2 "write -P 0x33 0 2k" "write -P 0x44 512k 1k"
  q create -f qcow2 -o cluster_size=16384,extended_l2=on ext-l2.qcow2 4M; io ext-l2.qcow2 "write -P 0x55 0 1k" "write -P 0x66 20k 2k" "write -z 40k 1k"
  q create -f qcow2 -o cluster_size=4096,refcount_bits=1 rc1.qcow2 4M; io rc1.qcow2 "${data[@]}"
  q create -f qcow2 -o cluster_size=4096,refcount_bits=64 rc64.qcow2 4M; io rc64.qcow2 "${data[@]}"
  q create -f qcow2 -o cluster_size=4096,lazy_refcounts=on lazy.qcow2 4M
  { head -c 65536 /dev/zero | tr '\0' 'a'; seq 1 2000; } > "$tmp/a.raw"
  q convert -f raw -O qcow2 -c -o cluster_size=4096 "$tmp/a.raw" comp-zlib.qcow2
  q convert -f raw -O qcow2 -c -o cluster_size=4096,compression_type=zstd "$tmp/a.raw" comp-zstd.qcow2
  # backing: only the name matters (the fuzz target never opens a backing file)
  q create -f qcow2 -o cluster_size=4096 "$tmp/base.qcow2" 4M
  q create -f qcow2 -o cluster_size=4096 -b "$tmp/base.qcow2" -F qcow2 overlay.qcow2; io overlay.qcow2 "write -P 0x77 4k 4k"
  q rebase -u -b base.qcow2 -F qcow2 overlay.qcow2
  q create -f qcow2 -o cluster_size=4096 snap.qcow2 4M; io snap.qcow2 "${data[@]}"
  q snapshot -c s1 snap.qcow2; io snap.qcow2 "write -P 0x99 0 4k"; q snapshot -c second snap.qcow2
  q create -f qcow2 -o cluster_size=65536 big-empty.qcow2 1T
  # corrupt bit (incompatible_features bit 1, header offset 72)
  cp v3-4k.qcow2 corrupt-bit.qcow2; printf '\0\0\0\0\0\0\0\2' | dd of=corrupt-bit.qcow2 bs=1 seek=72 conv=notrunc status=none
  # a leaked cluster: refcount of a free cluster set to 1 (check -r leaks material)
  q create -f qcow2 -o cluster_size=4096 leak.qcow2 1M; io leak.qcow2 "write -P 0x12 0 4k"
  qemu-img check -r all leak.qcow2 >/dev/null || true
)

# ---- xz: the kernel build's options and the others the container allows.
python3 - "$tmp/elf" <<'PY'
import sys, struct
text = bytes((i * 7 + 1) & 0xff for i in range(0x1000))
def elf(pvh=True):
    segs = [(0x1000000, text, 0x11000)]
    phnum = len(segs) + (1 if pvh else 0)
    out = bytearray(64 + 56 * phnum)
    offs = []
    for p, d, m in segs:
        offs.append(len(out)); out += d
    note_off = len(out)
    note = struct.pack('<III', 4, 8, 18) + b'Xen\0' + struct.pack('<Q', 0x1000100) if pvh else b''
    out += note
    out[0:16] = b'\x7fELF\x02\x01\x01' + b'\0' * 9
    struct.pack_into('<HHIQQQIHHHHHH', out, 16, 2, 62, 1, 0x1000000, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    for i, (p, d, m) in enumerate(segs):
        struct.pack_into('<IIQQQQQQ', out, 64 + 56 * i, 1, 7, offs[i], p + 0xffffffff80000000, p, len(d), m, 0x200000)
    if pvh:
        struct.pack_into('<IIQQQQQQ', out, 64 + 56 * len(segs), 4, 0, note_off, 0, 0, len(note), len(note), 4)
    return bytes(out)
open(sys.argv[1], 'wb').write(elf())
open(sys.argv[1] + '-nopvh', 'wb').write(elf(False))
PY
elf="$tmp/elf"
xz --format=xz --check=crc32 --x86 --lzma2=dict=1MiB -c "$elf" > xz/kernel-crc32-x86.xz
xz --format=xz --check=crc64 -c "$elf" > xz/crc64.xz
xz --format=xz --check=none -c "$elf" > xz/none.xz
xz --format=xz --check=sha256 -c "$elf" > xz/sha256.xz
xz --format=xz --check=crc32 --block-size=1024 -c "$elf" > xz/blocks-1k.xz
xz --format=xz --check=crc32 --x86 --lzma2=preset=0,dict=4KiB --block-size=2048 -c "$elf" > xz/x86-blocks.xz
xz --format=xz --check=crc32 --delta=dist=4 --lzma2 -c "$elf" > xz/delta.xz
head -c 0 /dev/null | xz --format=xz --check=crc32 -c > xz/empty.xz
head -c 20000 /dev/zero | xz --format=xz --check=crc32 -c > xz/zeros.xz
{ xz --format=xz --check=crc32 -c "$elf"; head -c 8 /dev/zero; } > xz/padded.xz

# ---- payloads: as scripts/Makefile.lib makes them (compressed stream + 32-bit size trailer; gzip has ISIZE).
size_append() { python3 -c "import struct,sys,os; sys.stdout.buffer.write(struct.pack('<I', os.path.getsize('$elf')))"; }
gzip -9 -n -c "$elf" > payload/gzip
{ xz --format=xz --check=crc32 --x86 --lzma2=dict=1MiB -c "$elf"; size_append; } > payload/xz
{ bzip2 -9 -c "$elf"; size_append; } > payload/bzip2
{ lzma -9 -c "$elf"; size_append; } > payload/lzma
{ zstd -q -19 -c "$elf"; size_append; } > payload/zstd
{ lz4 -l -9 -c "$elf"; size_append; } > payload/lz4
cp "$elf" payload/none

# ---- kernels: ELF vmlinux and bzImages (protocol 2.15 and 2.06) around the payloads above.
cp "$elf" kernel/vmlinux-pvh.elf
cp "$elf-nopvh" kernel/vmlinux.elf
python3 - payload kernel <<'PY'
import sys, struct, os
src, dst = sys.argv[1], sys.argv[2]
def bz(payload, version=0x020f, setup_sects=4):
    setup = ((setup_sects or 4) + 1) * 512
    pm_prefix = 0x100
    pm = (pm_prefix + len(payload) + 4 + 15) & ~15
    f = bytearray(setup + pm)
    f[0x1f1] = setup_sects
    struct.pack_into('<I', f, 0x1f4, pm // 16)
    struct.pack_into('<H', f, 0x1fa, 0xffff)
    struct.pack_into('<H', f, 0x1fe, 0xaa55)
    f[0x200] = 0xeb; f[0x201] = 0x6a
    f[0x202:0x206] = b'HdrS'
    struct.pack_into('<H', f, 0x206, version)
    f[0x211] = 1
    struct.pack_into('<I', f, 0x214, 0x100000)
    struct.pack_into('<I', f, 0x22c, 0x7fffffff)
    struct.pack_into('<I', f, 0x230, 0x200000)
    f[0x234] = 1; f[0x235] = 21
    struct.pack_into('<H', f, 0x236, 0x7f)
    struct.pack_into('<I', f, 0x238, 2047)
    struct.pack_into('<I', f, 0x248, pm_prefix)
    struct.pack_into('<I', f, 0x24c, len(payload))
    struct.pack_into('<Q', f, 0x258, 0x1000000)
    struct.pack_into('<I', f, 0x260, 0x200000)
    f[setup:setup + pm_prefix] = b'\x90' * pm_prefix
    f[setup + pm_prefix:setup + pm_prefix + len(payload)] = payload
    return bytes(f)
for name in sorted(os.listdir(src)):
    p = open(os.path.join(src, name), 'rb').read()
    open(os.path.join(dst, f'bzImage-{name}'), 'wb').write(bz(p))
open(os.path.join(dst, 'bzImage-2.06-gzip'), 'wb').write(bz(open(os.path.join(src, 'gzip'), 'rb').read(), version=0x0206, setup_sects=0))
PY
du -sh . */
