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
            int leaksFixed = 0, corruptionsFixed = 0;
            img.RepairInUse = refs; // clusters the metadata references are never handed out while repairing
            try
            {
                if (mode == RepairMode.All)
                {
                    // A refcount table entry naming an unreadable block: forget it; the range's refcounts are
                    // rebuilt below into a fresh block (qemu resizes the file to reach it; the effect is the same).
                    var refcountTable = img.RefcountTable;
                    for (ulong tableIndex = 0; tableIndex < (ulong)refcountTable.Length; tableIndex++)
                    {
                        ulong b = refcountTable[tableIndex] & Qcow2Const.OffsetMask;
                        if (b == 0 || img.IsRefcountBlockUsable(b)) continue;
                        r.Report($"Repairing refcount block {tableIndex} at 0x{b:x}: dropped, its refcounts are rebuilt");
                        img.DropRefcountBlock(tableIndex);
                        corruptionsFixed++;
                    }
                }
                for (ulong page = 0; page < refs.PageCount; page++)
                {
                    var currentTable = img.RefcountTable; // refcount-table growth replaces the array
                    ulong b = page < (ulong)currentTable.Length ? currentTable[page] & Qcow2Const.OffsetMask : 0;
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
                            leaksFixed++;
                        }
                        else if (mode == RepairMode.All)
                        {
                            r.Report($"Repairing cluster {ci} refcount={rc} reference={rf}");
                            img.SetRefcount(ci, rf);
                            corruptionsFixed++;
                        }
                    }
                }
                img.FlushMetadata();
            }
            finally { img.RepairInUse = null; }
            var after = Scan(img, log, out _);
            after.LeaksFixed = leaksFixed;
            after.CorruptionsFixed = corruptionsFixed;
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
        ulong highestCluster = Math.Max(highest, highestRc);
        r.ImageEndOffset = (highestCluster + 1) << img.ClusterBits;
        r.TotalClusters = (img.Size + (ulong)img.ClusterSize - 1) >> img.ClusterBits;
        return r;
    }

    /// <summary>Refcounts on disk against references found, one refcount block at a time; returns the
    /// highest cluster with a refcount on disk.</summary>
    private static ulong CompareRefcounts(Qcow2Image img, Result r, RefcountMap refs)
    {
        int order = img.Header.RefcountOrder;
        var block = new byte[img.ClusterSize];
        var refcountTable = img.RefcountTable;
        ulong perPage = 1UL << refs.PageBits;
        ulong highestRc = 0;
        for (ulong page = 0; page < refs.PageCount; page++)
        {
            ulong b = page < (ulong)refcountTable.Length ? refcountTable[page] & Qcow2Const.OffsetMask : 0;
            ReadOnlySpan<byte> counted = refs.Page(page);
            ReadOnlySpan<byte> disk = default;
            if (b != 0)
            {
                // Reported once by Count ("not cluster aligned" / "beyond the end of the image file"); its
                // refcounts cannot be read, so the whole range is skipped rather than failing per cluster.
                if (!img.IsRefcountBlockUsable(b)) continue;
                img.ReadRefcountBlock(b, block);
                disk = block;
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
        int clusterSize = img.ClusterSize;
        var l2Table = new byte[clusterSize];
        var l1 = img.L1;
        for (int i = 0; i < l1.Length; i++)
        {
            ulong l2 = l1[i] & Qcow2Const.OffsetMask;
            if (l2 == 0 || (l2 & (ulong)(clusterSize - 1)) != 0 || l2 + (ulong)clusterSize > img.FileEnd) continue;
            // A refcount that cannot be read (its block is reported already) says nothing about COPIED.
            bool known = img.TryGetRefcount(l2 >> img.ClusterBits, out ulong rc);
            bool copied = (l1[i] & Qcow2Const.CopiedFlag) != 0;
            if (known && (rc == 1) != copied)
                r.Corrupt($"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1[i]:x} refcount={rc}");
            img.ReadL2Table(l2, l2Table);
            bool extendedL2 = img.Header.ExtendedL2;
            for (int j = 0; j < clusterSize / img.L2EntrySize; j++)
            {
                var e = L2Entry.Read(l2Table, j, extendedL2);
                if (e.IsCompressed) continue;
                ulong h = e.HostOffset;
                if (h == 0 || (h & (ulong)(clusterSize - 1)) != 0 || h >= img.FileEnd) continue;
                if (img.TryGetRefcount(h >> img.ClusterBits, out ulong dataRefcount) && (dataRefcount == 1) != e.IsCopied)
                    r.Corrupt($"ERROR OFLAG_COPIED data cluster: l2_entry={e.Raw:x} refcount={dataRefcount}");
            }
        }
    }

    /// <summary>Counts references to every host cluster; reports malformed entries into <paramref name="r"/>.</summary>
    private static RefcountMap Count(Qcow2Image img, Result r, out ulong highest)
    {
        int clusterBits = img.ClusterBits;
        int clusterSize = img.ClusterSize;
        bool v3 = img.Header.Version >= 3;
        bool extendedL2 = img.Header.ExtendedL2;
        ulong fileClusters = img.FileEnd >> clusterBits;
        if (fileClusters > MaxCheckedClusters)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, img.Path, "image file too large to check");
        var refs = new RefcountMap(fileClusters, clusterBits, img.Header.RefcountOrder);
        ulong highestCluster = 0;
        void Add(ulong off, ulong bytes, string what)
        {
            if (bytes == 0) return;
            ulong end = off + bytes;
            if (end < off || (end - 1) >> clusterBits >= fileClusters)
            {
                r.Corrupt($"ERROR {what} at offset 0x{off:x} lies beyond the end of the image file");
                return;
            }
            for (ulong c = off >> clusterBits; c <= (end - 1) >> clusterBits; c++)
            {
                if (!refs.Increment(c)) r.Corrupt($"ERROR: overflow cluster offset=0x{c << clusterBits:x}");
                if (c > highestCluster) highestCluster = c;
            }
        }
        Add(0, (ulong)clusterSize, "header");
        var h = img.Header;

        var l2Table = new byte[clusterSize];
        void WalkL1(ulong[] l1, ulong l1Off, bool active)
        {
            Add(l1Off, (ulong)l1.Length * 8, "L1 table");
            for (int i = 0; i < l1.Length; i++)
            {
                ulong l2 = l1[i] & Qcow2Const.OffsetMask;
                if (l2 == 0) continue;
                if ((l2 & (ulong)(clusterSize - 1)) != 0)
                {
                    r.Corrupt($"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted");
                    continue;
                }
                if (l2 + (ulong)clusterSize > img.FileEnd)
                {
                    r.Corrupt($"ERROR l2_offset={l2:x}: L2 table lies beyond the end of the image file");
                    continue;
                }
                Add(l2, (ulong)clusterSize, "L2 table");
                img.ReadL2Table(l2, l2Table);
                ulong nextContig = 0;
                for (int j = 0; j < clusterSize / img.L2EntrySize; j++)
                {
                    var e = L2Entry.Read(l2Table, j, extendedL2);
                    if (e.IsCompressed)
                    {
                        if (e.IsCopied)
                            r.Corrupt($"ERROR: coffset=0x{e.Raw:x}: copied flag must never be set for compressed clusters");
                        img.DecodeCompressed(e, out ulong compressedOffset, out int compressedLength);
                        Add(compressedOffset, (ulong)compressedLength, "compressed cluster");
                        if (active) { r.AllocatedClusters++; r.CompressedClusters++; }
                        continue;
                    }
                    ulong host = e.HostOffset;
                    CheckEntryFlags(r, e, v3, extendedL2);
                    if (host == 0) continue;
                    if ((host & (ulong)(clusterSize - 1)) != 0)
                    {
                        // qcow2.txt "Standard Cluster Descriptor": bits 9-55 hold a cluster-aligned offset.
                        r.Corrupt($"ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted.");
                        continue;
                    }
                    Add(host, (ulong)clusterSize, "data cluster");
                    if (active)
                    {
                        r.AllocatedClusters++;
                        if (nextContig != 0 && host != nextContig) r.FragmentedClusters++;
                        nextContig = host + (ulong)clusterSize;
                    }
                }
            }
        }
        WalkL1(img.L1, img.L1Offset, true);
        Add(img.RefcountTableOffset, (ulong)img.RefcountTable.Length * 8, "refcount table");
        var refcountTable = img.RefcountTable;
        for (int i = 0; i < refcountTable.Length; i++)
        {
            ulong b = refcountTable[i] & Qcow2Const.OffsetMask;
            if (b == 0) continue;
            if ((b & (ulong)(clusterSize - 1)) != 0) { r.Corrupt($"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"); continue; }
            Add(b, (ulong)clusterSize, $"refcount block {i}");
        }
        if (h.NbSnapshots > 0)
        {
            var snaps = Qcow2Snapshots.Read(img, out ulong tb);
            Add(h.SnapshotsOffset, tb, "snapshot table");
            foreach (var s in snaps)
            {
                if ((s.L1Offset & (ulong)(clusterSize - 1)) != 0 || s.L1Offset + (ulong)s.L1Size * 8 > img.FileEnd)
                {
                    r.Corrupt($"ERROR snapshot {s.Id} L1 table at 0x{s.L1Offset:x} invalid");
                    continue;
                }
                var snapshotL1 = new ulong[s.L1Size];
                var raw = new byte[s.L1Size * 8];
                img.ReadHost(raw, s.L1Offset);
                for (int i = 0; i < snapshotL1.Length; i++) snapshotL1[i] = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
                WalkL1(snapshotL1, s.L1Offset, false);
            }
        }
        highest = highestCluster;
        return refs;
    }

    /// <summary>Flag combinations the reader refuses (qemu: "Image is corrupt") reported as corruptions.</summary>
    private static void CheckEntryFlags(Result r, L2Entry e, bool v3, bool extendedL2)
    {
        if (extendedL2)
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
