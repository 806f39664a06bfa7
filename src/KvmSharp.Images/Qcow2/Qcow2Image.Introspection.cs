namespace KvmSharp.Images.Qcow2;

/// <summary>What check, info and the snapshot table read of an open image: its tables as they are in
/// memory (including what is not flushed yet), raw reads of the file, and the refcounts.</summary>
public sealed partial class Qcow2Image
{
    internal ulong[] L1 => _l1;
    internal ulong L1Offset => _l1Offset;
    internal ulong[] RefcountTable => _refcounts.Table;
    internal ulong RefcountTableOffset => _refcounts.TableOffset;
    internal int ClusterBits => _clusterBits;
    internal int L2EntrySize => L2Entry.Size(_extendedL2);
    internal ulong FileEnd => _file.End;
    internal object SyncRoot => _lock;

    /// <summary>During repair: clusters referenced by metadata, never allocated.</summary>
    internal RefcountMap? RepairInUse { get => _refcounts.RepairInUse; set => _refcounts.RepairInUse = value; }

    internal void ReadHost(Span<byte> dst, ulong offset) => _file.Read(dst, offset);

    /// <summary>The L2 table at <paramref name="offset"/> as in the cache, or as on disk.</summary>
    internal void ReadL2Table(ulong offset, Span<byte> dst)
    {
        int slot = _l2Cache.Find(offset);
        if (slot >= 0) { _l2Cache.Span(slot).CopyTo(dst); return; }
        _file.ReadMetadata(dst, offset, "L2 table");
    }

    internal void ReadRefcountBlock(ulong offset, Span<byte> dst) => _refcounts.ReadBlock(offset, dst);

    /// <summary>Host offset and length of a compressed cluster's data (check counts its clusters).</summary>
    internal void DecodeCompressed(L2Entry entry, out ulong hostOffset, out int length)
    {
        hostOffset = entry.CompressedHostOffset(_clusterBits);
        length = CompressedLength(entry);
    }

    internal ulong GetRefcount(ulong cluster) => _refcounts.Get(cluster);
    internal bool TryGetRefcount(ulong cluster, out ulong refcount) => _refcounts.TryGet(cluster, out refcount);
    internal void SetRefcount(ulong cluster, ulong refcount) => _refcounts.Set(cluster, refcount);
    internal bool IsRefcountBlockUsable(ulong offset) => _refcounts.IsBlockUsable(offset);
    internal void DropRefcountBlock(ulong tableIndex) => _refcounts.DropBlock(tableIndex);
}
