using System.Buffers.Binary;

namespace KvmSharp.Images.Qcow2;

/// <summary>Consistency check and repair of refcounts, as qemu-img check (QEMU block/qcow2-refcount.c semantics).</summary>
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
        public readonly List<string> Messages = new();
        public ulong TotalClusters;
        public ulong AllocatedClusters;
        public ulong FragmentedClusters;
        public ulong CompressedClusters;
        public ulong ImageEndOffset;
    }

    /// <summary>Largest image we check in memory: 2^28 clusters (1 GiB of counters).</summary>
    private const ulong MaxCheckedClusters = 1UL << 28;

    public static Result Run(Qcow2Image img, RepairMode mode)
    {
        lock (img.SyncRoot)
        {
            if (!img.ReadOnly) img.FlushMetadata();
            var r = Scan(img);
            if (mode == RepairMode.None || img.ReadOnly || (r.Leaks == 0 && r.Corruptions == 0)) return r;
            if (img.Header.HasBitmapsExtension && (img.Header.Autoclear & Qcow2Const.AutoclearBitmaps) != 0)
                ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, img.Path, "cannot repair an image with persistent bitmaps");
            var refs = Count(img, null, out _);
            var inUse = new bool[refs.Length];
            for (int i = 0; i < refs.Length; i++) inUse[i] = refs[i] > 0;
            img.RepairInUse = inUse;
            int fixedLeaks = 0, fixedCorrupt = 0;
            try
            {
                ulong n = (ulong)refs.Length;
                for (ulong ci = 0; ci < n; ci++)
                {
                    ulong rc = img.GetRefcount(ci);
                    ulong rf = refs[ci];
                    if (rc == rf) continue;
                    if (rc > rf)
                    {
                        r.Messages.Add($"Repairing cluster {ci} refcount={rc} reference={rf}");
                        img.SetRefcount(ci, rf);
                        fixedLeaks++;
                    }
                    else if (mode == RepairMode.All)
                    {
                        r.Messages.Add($"Repairing cluster {ci} refcount={rc} reference={rf}");
                        img.SetRefcount(ci, rf);
                        fixedCorrupt++;
                    }
                }
                img.FlushMetadata();
            }
            finally { img.RepairInUse = null; }
            var after = Scan(img);
            after.Messages.InsertRange(0, r.Messages);
            after.LeaksFixed = fixedLeaks;
            after.CorruptionsFixed = fixedCorrupt;
            return after;
        }
    }

    private static Result Scan(Qcow2Image img)
    {
        var r = new Result();
        var refs = Count(img, r, out ulong highest);
        ulong n = (ulong)refs.Length;
        // Refcounts on disk against references found.
        ulong highestRc = 0;
        for (ulong ci = 0; ci < n; ci++)
        {
            ulong rc;
            try { rc = img.GetRefcount(ci); }
            catch (ImageException e) when (e.Kind == ImageErrorKind.Corrupt)
            {
                r.Messages.Add($"ERROR {e.Message}");
                r.Corruptions++;
                // Skip the rest of this refcount block's range.
                continue;
            }
            ulong rf = refs[ci];
            if (rc != 0) highestRc = ci;
            if (rc == rf) continue;
            if (rc < rf)
            {
                r.Messages.Add($"ERROR cluster {ci} refcount={rc} reference={rf}");
                r.Corruptions++;
            }
            else
            {
                r.Messages.Add($"Leaked cluster {ci} refcount={rc} reference={rf}");
                r.Leaks++;
            }
        }
        // QCOW_OFLAG_COPIED must be set exactly when the refcount is 1 (qcow2.txt L1/L2 entry bit 63).
        CheckCopied(img, r);
        ulong hi = Math.Max(highest, highestRc);
        r.ImageEndOffset = (hi + 1) << img.ClusterBits;
        r.TotalClusters = (img.Size + (ulong)img.ClusterSize - 1) >> img.ClusterBits;
        return r;
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
            ulong rc = SafeRefcount(img, l2 >> img.ClusterBits);
            bool copied = (l1[i] & Qcow2Const.CopiedFlag) != 0;
            if ((rc == 1) != copied)
            {
                r.Messages.Add($"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1[i]:x} refcount={rc}");
                r.Corruptions++;
            }
            img.ReadL2Table(l2, l2buf);
            for (int j = 0; j < cs / img.L2EntrySize; j++)
            {
                ulong e = BinaryPrimitives.ReadUInt64BigEndian(l2buf.AsSpan(j * img.L2EntrySize));
                if ((e & Qcow2Const.CompressedFlag) != 0) continue;
                ulong h = e & Qcow2Const.OffsetMask;
                if (h == 0 || (h & (ulong)(cs - 1)) != 0 || h >= img.FileEnd) continue;
                ulong drc = SafeRefcount(img, h >> img.ClusterBits);
                if ((drc == 1) != ((e & Qcow2Const.CopiedFlag) != 0))
                {
                    r.Messages.Add($"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={drc}");
                    r.Corruptions++;
                }
            }
        }
    }

    private static ulong SafeRefcount(Qcow2Image img, ulong ci)
    {
        try { return img.GetRefcount(ci); }
        catch (ImageException) { return 0; }
    }

    /// <summary>Counts references to every host cluster; reports malformed entries into <paramref name="r"/>.</summary>
    private static uint[] Count(Qcow2Image img, Result? r, out ulong highest)
    {
        int cb = img.ClusterBits;
        int cs = img.ClusterSize;
        ulong fileClusters = img.FileEnd >> cb;
        if (fileClusters > MaxCheckedClusters)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, img.Path, "image too large to check in memory");
        var refs = new uint[fileClusters];
        ulong hi = 0;
        void Err(string m)
        {
            if (r is null) return;
            r.Messages.Add(m);
            r.Corruptions++;
        }
        void Add(ulong off, ulong bytes, string what)
        {
            if (bytes == 0) return;
            ulong first = off >> cb;
            ulong last = (off + bytes - 1) >> cb;
            for (ulong c = first; c <= last; c++)
            {
                if (c >= fileClusters)
                {
                    Err($"ERROR {what} at offset 0x{off:x} lies beyond the end of the image file");
                    return;
                }
                if (refs[c] != uint.MaxValue) refs[c]++;
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
                    Err($"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted");
                    continue;
                }
                if (l2 + (ulong)cs > img.FileEnd)
                {
                    Err($"ERROR l2_offset={l2:x}: L2 table lies beyond the end of the image file");
                    continue;
                }
                Add(l2, (ulong)cs, "L2 table");
                img.ReadL2Table(l2, l2buf);
                ulong nextContig = 0;
                for (int j = 0; j < cs / img.L2EntrySize; j++)
                {
                    ulong e = BinaryPrimitives.ReadUInt64BigEndian(l2buf.AsSpan(j * img.L2EntrySize));
                    if ((e & Qcow2Const.CompressedFlag) != 0)
                    {
                        if ((e & Qcow2Const.CopiedFlag) != 0)
                            Err($"ERROR: coffset=0x{e:x}: copied flag must never be set for compressed clusters");
                        img.DecodeCompressed(e, out ulong co, out int clen);
                        Add(co, (ulong)clen, "compressed cluster");
                        if (active && r is not null) { r.AllocatedClusters++; r.CompressedClusters++; }
                        continue;
                    }
                    ulong hst = e & Qcow2Const.OffsetMask;
                    if (hst == 0) continue;
                    if ((hst & (ulong)(cs - 1)) != 0)
                    {
                        Err($"ERROR offset={hst:x}: Cluster is not properly aligned; L2 entry corrupted.");
                        continue;
                    }
                    Add(hst, (ulong)cs, "data cluster");
                    if (active && r is not null)
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
            if ((b & (ulong)(cs - 1)) != 0) { Err($"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"); continue; }
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
                    Err($"ERROR snapshot {s.Id} L1 table at 0x{s.L1Offset:x} invalid");
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
}
