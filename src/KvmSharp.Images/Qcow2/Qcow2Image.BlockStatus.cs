namespace KvmSharp.Images.Qcow2;

public sealed partial class Qcow2Image
{
    /// <inheritdoc/>
    /// <remarks>
    /// Walks the metadata, never the clusters one by one through the read path: an L1 entry of 0 (or an
    /// L1 index past the table) answers for its whole L2 range, and runs of L2 entries of the same kind are
    /// merged up to the end of their L2 table. So one call costs at most one L2 table scan, and walking a
    /// whole image costs O(L1 entries + allocated L2 entries). Entries qemu refuses are refused here too
    /// (qcow2.txt "Standard Cluster Descriptor", "Extended L2 Entries"): an unaligned host offset, the zero
    /// flag in a version 2 image, a subcluster both allocated and zero, or allocated without a host cluster.
    /// </remarks>
    public BlockExtent GetBlockStatus(ulong offset, ulong maxLength)
    {
        if (offset >= Size || maxLength == 0)
            ThrowHelper.Throw(ImageErrorKind.OutOfBounds, _path, $"block status at {offset} beyond disk size {Size}", (long)Math.Min(offset, long.MaxValue));
        ulong end = offset + Math.Min(maxLength, Size - offset);
        int l1Shift = _clusterBits + _l2Bits;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            ulong l1Index = offset >> l1Shift;
            if (l1Index >= (ulong)_l1.Length || (_l1[l1Index] & Qcow2Const.OffsetMask) == 0)
            {
                // qcow2.txt "Cluster mapping": an L1 entry of 0 means its whole L2 range is unallocated.
                ulong i = l1Index + 1;
                ulong pos = i << l1Shift;
                while (pos < end && i < (ulong)_l1.Length && (_l1[i] & Qcow2Const.OffsetMask) == 0)
                {
                    i++;
                    pos += 1UL << l1Shift;
                }
                if (i >= (ulong)_l1.Length) pos = end; // no L1 entries beyond the table: all unallocated
                return new BlockExtent(BlockState.Unallocated, Math.Min(pos, end) - offset);
            }
            ulong l2Offset = ValidL2Offset(_l1[l1Index], l1Index);
            ReadOnlySpan<byte> table = _l2Cache.Span(LoadL2(l2Offset));
            ulong tableEnd = Math.Min(end, (l1Index + 1) << l1Shift);
            return _extendedL2 ? ExtendedStatus(table, l2Offset, offset, tableEnd) : StandardStatus(table, l2Offset, offset, tableEnd);
        }
    }

    private BlockExtent StandardStatus(ReadOnlySpan<byte> table, ulong l2Offset, ulong offset, ulong end)
    {
        int index = L2Index(ClusterOf(offset));
        ulong offsetInCluster = offset & _clusterOffsetMask;
        var (state, host) = StandardMapping(table, index, l2Offset);
        if (host != BlockExtent.NoOffset) host += offsetInCluster;
        ulong pos = (ClusterOf(offset) + 1) << _clusterBits;
        ulong nextHost = host == BlockExtent.NoOffset ? host : host - offsetInCluster + (ulong)_clusterSize;
        for (index++; pos < end && index < _l2Entries; index++)
        {
            var (s, h) = StandardMapping(table, index, l2Offset);
            if (s != state || h != nextHost) break;
            pos += (ulong)_clusterSize;
            if (h != BlockExtent.NoOffset) nextHost += (ulong)_clusterSize;
        }
        return new BlockExtent(state, Math.Min(pos, end) - offset, host);
    }

    /// <summary>State and host cluster (or NoOffset) of standard L2 entry <paramref name="index"/>.</summary>
    private (BlockState, ulong) StandardMapping(ReadOnlySpan<byte> table, int index, ulong l2Offset)
    {
        var entry = L2Entry.Read(table, index, extendedL2: false);
        if (entry.IsCompressed) return (BlockState.Data, BlockExtent.NoOffset);
        ulong host = entry.HostOffset;
        if (entry.ZeroFlag && !_version3)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"Zero cluster entry found in pre-v3 image (L2 offset: 0x{l2Offset:x}, L2 index: 0x{index:x})", (long)(l2Offset + (ulong)index * 8));
        if (host != 0) CheckHostCluster(host, l2Offset, index);
        if (entry.ZeroFlag) return (BlockState.Zero, host == 0 ? BlockExtent.NoOffset : host);
        return host == 0 ? (BlockState.Unallocated, BlockExtent.NoOffset) : (BlockState.Data, host);
    }

    private void CheckHostCluster(ulong host, ulong l2Offset, int index)
    {
        if ((host & _clusterOffsetMask) != 0 || host < (ulong)_clusterSize)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"Cluster allocation offset 0x{host:x} unaligned (L2 offset: 0x{l2Offset:x}, L2 index: 0x{index:x})", (long)(l2Offset + (ulong)index * (ulong)L2Entry.Size(_extendedL2)));
    }

    private BlockExtent ExtendedStatus(ReadOnlySpan<byte> table, ulong l2Offset, ulong offset, ulong end)
    {
        // qcow2.txt "Extended L2 Entries": 32 subclusters per cluster; bitmap bit x = allocated, 32+x = zero.
        int subclusterBits = _clusterBits - 5;
        ulong subclusterSize = 1UL << subclusterBits;
        int index = L2Index(ClusterOf(offset));
        int subcluster = (int)((offset & _clusterOffsetMask) >> subclusterBits);
        var (state, host) = SubclusterMapping(table, index, subcluster, l2Offset);
        ulong offsetInSubcluster = offset & (subclusterSize - 1);
        ulong nextHost = host == BlockExtent.NoOffset ? host : host + subclusterSize;
        if (host != BlockExtent.NoOffset) host += offsetInSubcluster;
        ulong pos = offset - offsetInSubcluster + subclusterSize;
        while (pos < end)
        {
            if (++subcluster == L2Entry.SubclustersPerCluster)
            {
                subcluster = 0;
                if (++index == _l2Entries) break;
            }
            var (s, h) = SubclusterMapping(table, index, subcluster, l2Offset);
            if (s != state || h != nextHost) break;
            pos += subclusterSize;
            if (h != BlockExtent.NoOffset) nextHost += subclusterSize;
        }
        return new BlockExtent(state, Math.Min(pos, end) - offset, host);
    }

    private (BlockState, ulong) SubclusterMapping(ReadOnlySpan<byte> table, int index, int subcluster, ulong l2Offset)
    {
        var entry = L2Entry.Read(table, index, extendedL2: true);
        if (entry.IsCompressed) return (BlockState.Data, BlockExtent.NoOffset);
        ulong host = entry.HostOffset;
        bool allocated = entry.IsSubclusterAllocated(subcluster), zero = entry.IsSubclusterZero(subcluster);
        if (allocated && (zero || host == 0))
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"Invalid cluster entry found (L2 offset: 0x{l2Offset:x}, L2 index: 0x{index:x})", (long)(l2Offset + (ulong)index * 16));
        if (host == 0) return (zero ? BlockState.Zero : BlockState.Unallocated, BlockExtent.NoOffset);
        CheckHostCluster(host, l2Offset, index);
        ulong subclusterHost = host + ((ulong)subcluster << (_clusterBits - 5));
        return (allocated ? BlockState.Data : zero ? BlockState.Zero : BlockState.Unallocated, subclusterHost);
    }
}
