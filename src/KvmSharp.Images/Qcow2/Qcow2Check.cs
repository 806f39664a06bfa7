using System.Buffers.Binary;

namespace KvmSharp.Images.Qcow2;

/// <summary>Consistency check and repair of refcounts, as qemu-img check (QEMU block/qcow2-refcount.c semantics).</summary>
/// <remarks>
/// Resource bounds: the computed references live in a <see cref="RefcountMap"/> (pages only where a
/// cluster is referenced, entries as wide as the image's refcounts), and messages stream to the caller's
/// writer instead of being kept. Time is O(metadata + refcount blocks present): each refcount block is
/// compared with its page once; a block that cannot be read is reported once and its range skipped.
/// </remarks>
internal static class Qcow2Check
{
    public enum RepairMode { None, Leaks, All }

    public sealed class Result
    {
        public int Corruptions;
        public int Leaks;
        public int CorruptionsFixed;
        public int LeaksFixed;
        public int CheckErrors;
        public ulong TotalClusters;
        public ulong AllocatedClusters;
        public ulong FragmentedClusters;
        public ulong CompressedClusters;
        public ulong ImageEndOffset;

        /// <summary>Where messages go as they are found (qemu-img prints them to stderr); null drops them.</summary>
        public TextWriter? Log;

        public void Report(string message) => Log?.WriteLine(message);

        public void Corrupt(string message)
        {
            Report(message);
            Corruptions++;
        }
    }

    /// <summary>qemu-img check refuses files over INT_MAX clusters ("File too large").</summary>
    private const ulong MaxCheckedClusters = int.MaxValue;

    public static Result Run(Qcow2Image img, RepairMode mode, TextWriter? log = null)
    {
        lock (img.SyncRoot)
        {
            if (!img.ReadOnly) img.FlushMetadata();
            var r = Scan(img, log, out RefcountMap refs);
            if (mode == RepairMode.None || img.ReadOnly || (r.Leaks == 0 && r.Corruptions == 0)) return r;
            if (img.Header.HasBitmapsExtension && (img.Header.Autoclear & Qcow2Const.AutoclearBitmaps) != 0)
                ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, img.Path, "cannot repair an image with persistent bitmaps");
            int fixedLeaks = 0, fixedCorrupt = 0;
            img.RepairInUse = refs; // clusters the metadata references are never handed out while repairing
            try
            {
                if (mode == RepairMode.All)
                {
                    // A refcount table entry naming an unreadable block: forget it; the range's refcounts are
                    // rebuilt below into a fresh block (qemu resizes the file to reach it; the effect is the same).
                    var rt = img.RefcountTable;
                    for (ulong rti = 0; rti < (ulong)rt.Length; rti++)
                    {
                        ulong b = rt[rti] & Qcow2Const.OffsetMask;
                        if (b == 0 || img.IsRefcountBlockUsable(b)) continue;
                        r.Report($"Repairing refcount block {rti} at 0x{b:x}: dropped, its refcounts are rebuilt");
                        img.DropRefcountBlock(rti);
                        fixedCorrupt++;
                    }
                }
                for (ulong page = 0; page < refs.PageCount; page++)
                {
                    var rtNow = img.RefcountTable; // refcount-table growth replaces the array
                    ulong b = page < (ulong)rtNow.Length ? rtNow[page] & Qcow2Const.OffsetMask : 0;
                    if (b == 0 && refs.Page(page).IsEmpty) continue; // nothing counted, nothing on disk
                    if (b != 0 && !img.IsRefcountBlockUsable(b)) continue; // -r leaks leaves unreadable blocks alone
                    ulong first = page << refs.PageBits;
                    ulong last = Math.Min(refs.Clusters, first + (1UL << refs.PageBits));
                    for (ulong ci = first; ci < last; ci++)
                    {
                        ulong rc = img.GetRefcount(ci);
                        ulong rf = refs.Get(ci);
                        if (rc == rf) continue;
                        if (rc > rf)
                        {
                            r.Report($"Repairing cluster {ci} refcount={rc} reference={rf}");
                            img.SetRefcount(ci, rf);
                            fixedLeaks++;
                        }
                        else if (mode == RepairMode.All)
                        {
                            r.Report($"Repairing cluster {ci} refcount={rc} reference={rf}");
                            img.SetRefcount(ci, rf);
                            fixedCorrupt++;
                        }
                    }
                }
                img.FlushMetadata();
            }
            finally { img.RepairInUse = null; }
            var after = Scan(img, log, out _);
            after.LeaksFixed = fixedLeaks;
            after.CorruptionsFixed = fixedCorrupt;
            return after;
        }
    }

    private static Result Scan(Qcow2Image img, TextWriter? log, out RefcountMap refs)
    {
        var r = new Result { Log = log };
        refs = Count(img, r, out ulong highest);
        ulong highestRc = CompareRefcounts(img, r, refs);
        // QCOW_OFLAG_COPIED must be set exactly when the refcount is 1 (qcow2.txt L1/L2 entry bit 63).
        CheckCopied(img, r);
        ulong hi = Math.Max(highest, highestRc);
        r.ImageEndOffset = (hi + 1) << img.ClusterBits;
        r.TotalClusters = (img.Size + (ulong)img.ClusterSize - 1) >> img.ClusterBits;
        return r;
    }

    /// <summary>Refcounts on disk against references found, one refcount block at a time; returns the
    /// highest cluster with a refcount on disk.</summary>
    private static ulong CompareRefcounts(Qcow2Image img, Result r, RefcountMap refs)
    {
        int order = img.Header.RefcountOrder;
        var blk = new byte[img.ClusterSize];
        var rt = img.RefcountTable;
        ulong perPage = 1UL << refs.PageBits;
        ulong highestRc = 0;
        for (ulong page = 0; page < refs.PageCount; page++)
        {
            ulong b = page < (ulong)rt.Length ? rt[page] & Qcow2Const.OffsetMask : 0;
            ReadOnlySpan<byte> counted = refs.Page(page);
            ReadOnlySpan<byte> disk = default;
            if (b != 0)
            {
                // Reported once by Count ("not cluster aligned" / "beyond the end of the image file"); its
                // refcounts cannot be read, so the whole range is skipped rather than failing per cluster.
                if (!img.IsRefcountBlockUsable(b)) continue;
                img.ReadRefcountBlock(b, blk);
                disk = blk;
            }
            if (disk.IsEmpty && counted.IsEmpty) continue;
            ulong first = page << refs.PageBits;
            ulong count = Math.Min(perPage, refs.Clusters - first);
            if (count == perPage && counted.Length == disk.Length && counted.SequenceEqual(disk))
            {
                int lastByte = disk.LastIndexOfAnyExcept((byte)0);
                if (lastByte >= 0)
                {
                    ulong e = (((ulong)lastByte + 1) << 3 >> order) - 1; // last entry in that byte
                    while (RefcountBlock.Get(disk, e, order) == 0) e--;
                    highestRc = first + e;
                }
                continue;
            }
            for (ulong i = 0; i < count; i++)
            {
                ulong rc = disk.IsEmpty ? 0 : RefcountBlock.Get(disk, i, order);
                ulong rf = counted.IsEmpty ? 0 : RefcountBlock.Get(counted, i, order);
                ulong ci = first + i;
                if (rc != 0) highestRc = ci;
                if (rc == rf) continue;
                if (rc < rf) r.Corrupt($"ERROR cluster {ci} refcount={rc} reference={rf}");
                else
                {
                    r.Report($"Leaked cluster {ci} refcount={rc} reference={rf}");
                    r.Leaks++;
                }
            }
        }
        return highestRc;
    }

    private static void CheckCopied(Qcow2Image img, Result r)
    {
        int cs = img.ClusterSize;
        var l2buf = new byte[cs];
        var l1 = img.L1;
        for (int i = 0; i < l1.Length; i++)
        {
            ulong l2 = l1[i] & Qcow2Const.OffsetMask;
            if (l2 == 0 || (l2 & (ulong)(cs - 1)) != 0 || l2 + (ulong)cs > img.FileEnd) continue;
            // A refcount that cannot be read (its block is reported already) says nothing about COPIED.
            bool known = img.TryGetRefcount(l2 >> img.ClusterBits, out ulong rc);
            bool copied = (l1[i] & Qcow2Const.CopiedFlag) != 0;
            if (known && (rc == 1) != copied)
                r.Corrupt($"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1[i]:x} refcount={rc}");
            img.ReadL2Table(l2, l2buf);
            bool ext = img.Header.ExtendedL2;
            for (int j = 0; j < cs / img.L2EntrySize; j++)
            {
                var e = L2Entry.Read(l2buf, j, ext);
                if (e.IsCompressed) continue;
                ulong h = e.HostOffset;
                if (h == 0 || (h & (ulong)(cs - 1)) != 0 || h >= img.FileEnd) continue;
                if (img.TryGetRefcount(h >> img.ClusterBits, out ulong drc) && (drc == 1) != e.IsCopied)
                    r.Corrupt($"ERROR OFLAG_COPIED data cluster: l2_entry={e.Raw:x} refcount={drc}");
            }
        }
    }

    /// <summary>Counts references to every host cluster; reports malformed entries into <paramref name="r"/>.</summary>
    private static RefcountMap Count(Qcow2Image img, Result r, out ulong highest)
    {
        int cb = img.ClusterBits;
        int cs = img.ClusterSize;
        bool v3 = img.Header.Version >= 3;
        bool ext = img.Header.ExtendedL2;
        ulong fileClusters = img.FileEnd >> cb;
        if (fileClusters > MaxCheckedClusters)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, img.Path, "image file too large to check");
        var refs = new RefcountMap(fileClusters, cb, img.Header.RefcountOrder);
        ulong hi = 0;
        void Add(ulong off, ulong bytes, string what)
        {
            if (bytes == 0) return;
            ulong end = off + bytes;
            if (end < off || (end - 1) >> cb >= fileClusters)
            {
                r.Corrupt($"ERROR {what} at offset 0x{off:x} lies beyond the end of the image file");
                return;
            }
            for (ulong c = off >> cb; c <= (end - 1) >> cb; c++)
            {
                if (!refs.Increment(c)) r.Corrupt($"ERROR: overflow cluster offset=0x{c << cb:x}");
                if (c > hi) hi = c;
            }
        }
        Add(0, (ulong)cs, "header");
        var h = img.Header;

        var l2buf = new byte[cs];
        void WalkL1(ulong[] l1, ulong l1Off, bool active)
        {
            Add(l1Off, (ulong)l1.Length * 8, "L1 table");
            for (int i = 0; i < l1.Length; i++)
            {
                ulong l2 = l1[i] & Qcow2Const.OffsetMask;
                if (l2 == 0) continue;
                if ((l2 & (ulong)(cs - 1)) != 0)
                {
                    r.Corrupt($"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted");
                    continue;
                }
                if (l2 + (ulong)cs > img.FileEnd)
                {
                    r.Corrupt($"ERROR l2_offset={l2:x}: L2 table lies beyond the end of the image file");
                    continue;
                }
                Add(l2, (ulong)cs, "L2 table");
                img.ReadL2Table(l2, l2buf);
                ulong nextContig = 0;
                for (int j = 0; j < cs / img.L2EntrySize; j++)
                {
                    var e = L2Entry.Read(l2buf, j, ext);
                    if (e.IsCompressed)
                    {
                        if (e.IsCopied)
                            r.Corrupt($"ERROR: coffset=0x{e.Raw:x}: copied flag must never be set for compressed clusters");
                        img.DecodeCompressed(e, out ulong co, out int clen);
                        Add(co, (ulong)clen, "compressed cluster");
                        if (active) { r.AllocatedClusters++; r.CompressedClusters++; }
                        continue;
                    }
                    ulong hst = e.HostOffset;
                    CheckEntryFlags(r, e, v3, ext);
                    if (hst == 0) continue;
                    if ((hst & (ulong)(cs - 1)) != 0)
                    {
                        // qcow2.txt "Standard Cluster Descriptor": bits 9-55 hold a cluster-aligned offset.
                        r.Corrupt($"ERROR offset={hst:x}: Data cluster is not properly aligned; L2 entry corrupted.");
                        continue;
                    }
                    Add(hst, (ulong)cs, "data cluster");
                    if (active)
                    {
                        r.AllocatedClusters++;
                        if (nextContig != 0 && hst != nextContig) r.FragmentedClusters++;
                        nextContig = hst + (ulong)cs;
                    }
                }
            }
        }
        WalkL1(img.L1, img.L1Offset, true);
        Add(img.RefcountTableOffset, (ulong)img.RefcountTable.Length * 8, "refcount table");
        var rt = img.RefcountTable;
        for (int i = 0; i < rt.Length; i++)
        {
            ulong b = rt[i] & Qcow2Const.OffsetMask;
            if (b == 0) continue;
            if ((b & (ulong)(cs - 1)) != 0) { r.Corrupt($"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"); continue; }
            Add(b, (ulong)cs, $"refcount block {i}");
        }
        if (h.NbSnapshots > 0)
        {
            var snaps = Qcow2Snapshots.Read(img, out ulong tb);
            Add(h.SnapshotsOffset, tb, "snapshot table");
            foreach (var s in snaps)
            {
                if ((s.L1Offset & (ulong)(cs - 1)) != 0 || s.L1Offset + (ulong)s.L1Size * 8 > img.FileEnd)
                {
                    r.Corrupt($"ERROR snapshot {s.Id} L1 table at 0x{s.L1Offset:x} invalid");
                    continue;
                }
                var sl1 = new ulong[s.L1Size];
                var raw = new byte[s.L1Size * 8];
                img.ReadHost(raw, s.L1Offset);
                for (int i = 0; i < sl1.Length; i++) sl1[i] = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
                WalkL1(sl1, s.L1Offset, false);
            }
        }
        highest = hi;
        return refs;
    }

    /// <summary>Flag combinations the reader refuses (qemu: "Image is corrupt") reported as corruptions.</summary>
    private static void CheckEntryFlags(Result r, L2Entry e, bool v3, bool ext)
    {
        if (ext)
        {
            ulong bitmap = e.SubclusterBitmap;
            // qcow2.txt "Extended L2 Entries": bit x = subcluster allocated, bit 32+x = reads as zeros;
            // both set is invalid, and allocated subclusters need a host cluster.
            uint alloc = (uint)bitmap, zero = (uint)(bitmap >> 32);
            if (e.HostOffset == 0 && alloc != 0)
                r.Corrupt($"ERROR: Unallocated cluster has non-zero subcluster allocation map (l2_entry={e.Raw:x} bitmap={bitmap:x})");
            else if ((alloc & zero) != 0)
                r.Corrupt($"ERROR offset={e.HostOffset:x}: Allocated cluster has corrupted subcluster allocation bitmap (bitmap={bitmap:x})");
        }
        else if (!v3 && e.ZeroFlag)
        {
            // qcow2.txt "Standard Cluster Descriptor", bit 0: "With version 2 ... this is always 0".
            r.Corrupt($"ERROR l2_entry={e.Raw:x}: zero flag set in a version 2 (compat=0.10) image; L2 entry corrupted");
        }
    }
}
