namespace KvmSharp.Images.Qcow2;

/// <summary>Operations of the <c>img</c> commands beyond the block-device contract: resize, compressed
/// writes (convert -c), unmapping (commit), header rewrites (rebase, check).</summary>
public sealed partial class Qcow2Image
{
    /// <summary>Grows the virtual disk (shrinking is refused, as qemu-img without --shrink).</summary>
    public void Resize(ulong newSize)
    {
        if (ReadOnly) ThrowHelper.Throw(ImageErrorKind.ReadOnly, _path, "image is opened read-only");
        if (newSize > Qcow2Const.MaxVirtualSize) ThrowHelper.Throw(ImageErrorKind.InvalidArgument, _path, "size too large");
        lock (_lock)
        {
            if (newSize < Size)
                ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, _path, "shrinking a qcow2 image is not supported");
            ulong bytesPerL1Entry = 1UL << (_clusterBits + _l2Bits);
            ulong neededL1 = (newSize + bytesPerL1Entry - 1) / bytesPerL1Entry;
            if (neededL1 > (ulong)_l1.Length) GrowL1(neededL1);
            _file.WriteHeaderField(Qcow2Header.Field.Size, newSize);
            Header.Size = newSize;
            Size = newSize;
            FlushMetadata();
            _file.Sync();
        }
    }

    /// <summary>Moves the L1 table to a larger one at the end of the file: the new table is written and
    /// synced before the header names it, and the old one is freed after.</summary>
    private void GrowL1(ulong entries)
    {
        if (entries * 8 > Qcow2Const.MaxL1Bytes) ThrowHelper.Throw(ImageErrorKind.InvalidArgument, _path, "size too large for the L1 table");
        FlushMetadata();
        var newL1 = new ulong[entries];
        Array.Copy(_l1, newL1, _l1.Length);
        ulong clusters = (entries * 8 + _clusterOffsetMask) >> _clusterBits;
        ulong newOffset = _refcounts.AllocateContiguousAtEnd(clusters);
        _refcounts.Flush();
        _file.WriteTable(newL1, 0, newL1.Length, newOffset);
        ulong tableBytes = (ulong)newL1.Length * 8;
        if ((tableBytes & _clusterOffsetMask) != 0)
            _file.Write(ZeroBuffer.Span[..(int)((clusters << _clusterBits) - tableBytes)], newOffset + tableBytes);
        _file.Sync();
        ulong oldOffset = _l1Offset;
        ulong oldClusters = ((ulong)_l1.Length * 8 + _clusterOffsetMask) >> _clusterBits;
        _file.WriteL1TableFields((uint)entries, newOffset);
        _file.Sync();
        _l1 = newL1;
        _l1Offset = newOffset;
        Header.L1Size = (uint)entries;
        Header.L1TableOffset = newOffset;
        if (oldOffset != 0) _refcounts.DeferFree(oldOffset, oldClusters << _clusterBits);
    }

    private ulong _compressedCursor; // next free byte in the cluster holding the last compressed data, or 0

    /// <summary>Writes one whole virtual cluster compressed (convert -c). Falls back to a normal write when
    /// compression does not help. qcow2.txt "Compressed Clusters Descriptor".</summary>
    internal void WriteCompressedCluster(ulong virtualCluster, ReadOnlySpan<byte> cluster)
    {
        lock (_lock)
        {
            int length = _codec.Compress(cluster);
            if (length <= 0 || length >= _clusterSize - 512)
            {
                WriteWholeCluster(cluster, virtualCluster);
                return;
            }
            ulong host;
            ulong cursorCluster = _compressedCursor >> _clusterBits;
            if (_compressedCursor != 0 && (_compressedCursor & _clusterOffsetMask) != 0 && ((_compressedCursor + (ulong)length - 1) >> _clusterBits) == cursorCluster)
            {
                host = _compressedCursor; // shares the cluster: one more reference
                _refcounts.Set(cursorCluster, _refcounts.Get(cursorCluster) + 1);
            }
            else
            {
                host = _refcounts.AllocateCluster();
            }
            _file.Write(_codec.CompressedBuffer[..length], host);
            _compressedCursor = host + (ulong)length;
            int slot = GetL2ForWrite(virtualCluster >> _l2Bits);
            int index = L2Index(virtualCluster);
            L2Entry old = L2Entry.Read(_l2Cache.Span(slot), index, _extendedL2);
            SetEntry(slot, index, L2Entry.Compressed(host, length, _clusterBits));
            DeferFreeClusterOf(old);
        }
    }

    private void WriteWholeCluster(ReadOnlySpan<byte> cluster, ulong virtualCluster)
    {
        int n = (int)Math.Min((ulong)_clusterSize, Size - (virtualCluster << _clusterBits));
        WriteChunk(cluster[..n], virtualCluster << _clusterBits);
    }

    /// <summary>Makes a virtual cluster unallocated again, so reads fall through to the backing file.</summary>
    internal void UnmapCluster(ulong virtualCluster)
    {
        lock (_lock)
        {
            ulong l1Index = virtualCluster >> _l2Bits;
            if ((_l1[l1Index] & Qcow2Const.OffsetMask) == 0) return;
            int slot = GetL2ForWrite(l1Index);
            int index = L2Index(virtualCluster);
            L2Entry entry = L2Entry.Read(_l2Cache.Span(slot), index, _extendedL2);
            if (entry.Raw == 0 && entry.SubclusterBitmap == 0) return;
            DeferFreeClusterOf(entry);
            SetEntry(slot, index, default);
        }
    }

    /// <summary>Rewrites incompatible_features (clearing the dirty or corrupt bit after a repair), synced.</summary>
    internal void SetHeaderDirtyBits(ulong incompatible)
    {
        Header.Incompatible = incompatible;
        _file.WriteHeaderField(Qcow2Header.Field.IncompatibleFeatures, incompatible);
        _file.Sync();
    }

    /// <summary>Rewrites the backing file name and format in the header cluster (rebase).</summary>
    internal void SetBacking(string? name, string? format)
    {
        lock (_lock)
        {
            FlushMetadata();
            var buf = new byte[_clusterSize];
            Header.BackingFile = name;
            Header.BackingFormat = name is null ? null : format;
            Header.Write(buf, writeFeatureTable: Header.Version >= 3);
            // Header.Write sets HeaderLength=112 for v3; extensions are rewritten from the parsed header.
            _file.Write(buf.AsSpan(0, _clusterSize), 0);
            _file.Sync();
        }
    }
}
