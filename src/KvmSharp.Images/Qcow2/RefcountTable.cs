namespace KvmSharp.Images.Qcow2;

/// <summary>
/// The refcounts of a qcow2 image, qcow2.txt "Host cluster management": the refcount table (kept in
/// memory whole) and its refcount blocks (cached), cluster allocation, refcount-table growth, and the
/// refcount decrements that must wait until the references are gone from disk.
/// <para>Crash safety: a new refcount block reaches the disk before the table entry naming it; a new
/// table (with the blocks describing it) is written and synced before the header names it, and the old
/// table's clusters are freed only after that. Refcount blocks may be written at any time: a count on
/// disk that is too high is a leak, never a corruption.</para>
/// <para>Not thread-safe: the image's lock covers it.</para>
/// </summary>
internal sealed class RefcountTable
{
    private readonly Qcow2File _file;
    private readonly Qcow2Header _header;
    private readonly int _clusterBits;
    private readonly int _clusterSize;
    private readonly ulong _clusterOffsetMask;
    private readonly int _refcountOrder;
    private readonly int _blockBits;   // log2(refcounts per refcount block)
    private ulong[] _table;
    private ulong _tableOffset;
    private int _dirtyMin = int.MaxValue, _dirtyMax = -1; // table entries changed since the last flush
    private readonly MetadataCache _blocks;
    private readonly List<ulong> _deferredFrees = new(256); // clusters whose refcount drops at the next flush
    private ulong _freeHint;            // no free cluster below it
    private ulong _reservedStart, _reservedEnd; // cluster indices kept free while the refcount table moves

    public RefcountTable(Qcow2File file, Qcow2Header header)
    {
        _file = file;
        _header = header;
        _clusterBits = header.ClusterBits;
        _clusterSize = header.ClusterSize;
        _clusterOffsetMask = (ulong)_clusterSize - 1;
        _refcountOrder = header.RefcountOrder;
        _blockBits = _clusterBits + 3 - _refcountOrder;
        _tableOffset = header.RefcountTableOffset;
        _table = new ulong[((ulong)header.RefcountTableClusters << _clusterBits) / 8];
        file.ReadTable(_table, _tableOffset, "refcount table");
        // 1 MiB of refcount blocks.
        _blocks = new MetadataCache(Math.Clamp((1 << 20) / _clusterSize, 4, 256), _clusterSize);
    }

    /// <summary>The refcount table's entries (a new array after growth).</summary>
    public ulong[] Table => _table;

    public ulong TableOffset => _tableOffset;

    /// <summary>During repair: clusters the metadata references, never handed out by the allocator.</summary>
    public RefcountMap? RepairInUse { get; set; }

    private ulong MaxRefcount => RefcountBlock.MaxRefcount(_refcountOrder);

    private ulong IndexInBlock(ulong cluster) => cluster & ((1UL << _blockBits) - 1);

    private void MarkTableDirty(ulong index)
    {
        _dirtyMin = Math.Min(_dirtyMin, (int)index);
        _dirtyMax = Math.Max(_dirtyMax, (int)index);
    }

    // ---------------------------------------------------------------- refcount blocks

    private int LoadBlock(ulong offset, ulong tableIndex)
    {
        int slot = _blocks.Find(offset);
        if (slot >= 0) return slot;
        if ((offset & _clusterOffsetMask) != 0 || offset < (ulong)_clusterSize)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _file.Path, $"refcount table entry {tableIndex} has invalid offset 0x{offset:x}", (long)(_tableOffset + tableIndex * 8));
        slot = _blocks.Victim();
        if (_blocks.IsDirty(slot)) WriteBlock(slot);
        _file.ReadMetadata(_blocks.Span(slot), offset, "refcount block");
        _blocks.Assign(slot, offset);
        return slot;
    }

    private void WriteBlock(int slot)
    {
        _file.Write(_blocks.Span(slot), _blocks.OffsetOf(slot));
        _blocks.MarkClean(slot);
    }

    /// <summary>The refcount block at <paramref name="offset"/> as on disk or in the cache (check).</summary>
    public void ReadBlock(ulong offset, Span<byte> dst)
    {
        int slot = _blocks.Find(offset);
        if (slot >= 0) { _blocks.Span(slot).CopyTo(dst); return; }
        _file.ReadMetadata(dst, offset, "refcount block");
    }

    /// <summary>True when a refcount block at <paramref name="offset"/> can be read: aligned, past the header,
    /// inside the file (qemu-img check: "refcount block is not cluster aligned" / "is outside image").</summary>
    public bool IsBlockUsable(ulong offset) => (offset & _clusterOffsetMask) == 0 && offset >= (ulong)_clusterSize && offset + (ulong)_clusterSize <= _file.End;

    /// <summary>Repair: forgets an unusable refcount block, so its range gets a fresh one when next written.</summary>
    public void DropBlock(ulong tableIndex)
    {
        _table[tableIndex] = 0;
        MarkTableDirty(tableIndex);
    }

    // ---------------------------------------------------------------- refcounts

    public ulong Get(ulong cluster)
    {
        ulong tableIndex = cluster >> _blockBits;
        if (tableIndex >= (ulong)_table.Length) return 0;
        ulong block = _table[tableIndex] & Qcow2Const.OffsetMask;
        if (block == 0) return 0;
        int slot = LoadBlock(block, tableIndex);
        return RefcountBlock.Get(_blocks.Span(slot), IndexInBlock(cluster), _refcountOrder);
    }

    /// <summary>Refcount of <paramref name="cluster"/>, or false when its refcount block cannot be read.</summary>
    public bool TryGet(ulong cluster, out ulong refcount)
    {
        refcount = 0;
        ulong tableIndex = cluster >> _blockBits;
        if (tableIndex >= (ulong)_table.Length) return true;
        ulong block = _table[tableIndex] & Qcow2Const.OffsetMask;
        if (block == 0) return true;
        if (!IsBlockUsable(block)) return false;
        refcount = RefcountBlock.Get(_blocks.Span(LoadBlock(block, tableIndex)), IndexInBlock(cluster), _refcountOrder);
        return true;
    }

    public void Set(ulong cluster, ulong refcount)
    {
        if (refcount > MaxRefcount)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, _file.Path, $"refcount of cluster {cluster} would exceed {1 << _refcountOrder}-bit refcounts", (long)(cluster << _clusterBits));
        ulong tableIndex = cluster >> _blockBits;
        if (tableIndex >= (ulong)_table.Length) Grow(tableIndex + 1);
        ulong block = _table[tableIndex] & Qcow2Const.OffsetMask;
        if (block == 0) block = CreateBlock(tableIndex);
        int slot = LoadBlock(block, tableIndex);
        RefcountBlock.Set(_blocks.Span(slot), IndexInBlock(cluster), _refcountOrder, refcount);
        _blocks.MarkDirty(slot);
        if (refcount == 0 && cluster < _freeHint) _freeHint = cluster;
    }

    /// <summary>Sets a refcount of 1 in a block that exists (clusters being reserved for a new table).</summary>
    private void SetOneInExistingBlock(ulong cluster)
    {
        ulong tableIndex = cluster >> _blockBits;
        if ((_table[tableIndex] & Qcow2Const.OffsetMask) == 0) CreateBlock(tableIndex); // placed outside the reserved run
        int slot = LoadBlock(_table[tableIndex] & Qcow2Const.OffsetMask, tableIndex);
        RefcountBlock.Set(_blocks.Span(slot), IndexInBlock(cluster), _refcountOrder, 1);
        _blocks.MarkDirty(slot);
    }

    private bool IsReserved(ulong cluster)
        => cluster >= _reservedStart && cluster < _reservedEnd || RepairInUse is { } inUse && cluster < inUse.Clusters && inUse.Get(cluster) != 0;

    /// <summary>
    /// Creates the refcount block for range <paramref name="tableIndex"/> inside that range, so it describes itself.
    /// A range without a block has no allocated cluster, so its first non-reserved cluster is free.
    /// </summary>
    private ulong CreateBlock(ulong tableIndex)
    {
        ulong first = tableIndex << _blockBits;
        ulong count = 1UL << _blockBits;
        ulong place = first;
        while (place < first + count && (IsReserved(place) || place == 0)) place++;
        bool selfDescribing = place < first + count;
        if (!selfDescribing)
        {
            // The whole range is a reserved run (a long table being placed): put the block right after
            // the run, in a later range, and extend the run over it so nothing else claims it.
            if (_reservedEnd >= first + count)
            {
                place = _reservedEnd;
                while (Get(place) != 0 || IsReserved(place)) place++;
                _reservedEnd = place + 1;
            }
            else
            {
                // Repair after an unreadable block was dropped: every cluster of the range is referenced.
                // The block goes to the first free cluster elsewhere, counted in that range's block.
                place = Math.Max(_freeHint, 1);
                while (place >= first && place < first + count || Get(place) != 0 || IsReserved(place)) place++;
            }
        }
        // During repair the new block is metadata the computed references did not know: count it, so
        // nothing else is placed there and the repair does not "fix" its refcount back to 0.
        if (RepairInUse is { } inUse && place < inUse.Clusters) inUse.Increment(place);
        ulong offset = place << _clusterBits;
        int slot = _blocks.Victim();
        if (_blocks.IsDirty(slot)) WriteBlock(slot);
        var block = _blocks.Span(slot);
        block.Clear();
        _blocks.Assign(slot, offset);
        if (selfDescribing) RefcountBlock.Set(block, place - first, _refcountOrder, 1);
        _blocks.MarkDirty(slot);
        // The block itself must reach disk before the table entry that names it.
        WriteBlock(slot);
        _table[tableIndex] = offset;
        MarkTableDirty(tableIndex);
        _file.ExtendTo(offset + (ulong)_clusterSize);
        if (!selfDescribing) Set(place, 1); // counted in its own range's block (created if needed)
        return offset;
    }

    // ---------------------------------------------------------------- allocation

    /// <summary>Allocates one cluster (refcount 1) and returns its host offset.</summary>
    public ulong AllocateCluster()
    {
        ulong cluster = _freeHint == 0 ? 1 : _freeHint;
        while (true)
        {
            ulong tableIndex = cluster >> _blockBits;
            if (tableIndex >= (ulong)_table.Length) Grow(tableIndex + 1);
            if ((_table[tableIndex] & Qcow2Const.OffsetMask) == 0) CreateBlock(tableIndex);
            if (!IsReserved(cluster) && Get(cluster) == 0) break;
            cluster++;
            if (cluster > (Qcow2Const.MaxVirtualSize >> _clusterBits))
                ThrowHelper.Throw(ImageErrorKind.Io, _file.Path, "image file would grow beyond the supported size", -1);
        }
        Set(cluster, 1);
        _freeHint = cluster + 1;
        ulong offset = cluster << _clusterBits;
        _file.ExtendTo(offset + (ulong)_clusterSize);
        return offset;
    }

    /// <summary>Allocates <paramref name="count"/> contiguous clusters at the end of the file.</summary>
    public ulong AllocateContiguousAtEnd(ulong count)
    {
        // Grow the refcount table first, so no growth happens while our run is reserved.
        while (((ulong)_table.Length << _blockBits) <= (_file.End >> _clusterBits) + count + 2)
            Grow(((_file.End >> _clusterBits) + count + 2 >> _blockBits) + 1);
        ulong start = _file.End >> _clusterBits;
        _file.ExtendTo((start + count) << _clusterBits);
        _reservedStart = start;
        _reservedEnd = start + count;
        try
        {
            for (ulong i = 0; i < count; i++) SetOneInExistingBlock(start + i);
        }
        finally { _reservedStart = _reservedEnd = 0; }
        return start << _clusterBits;
    }

    /// <summary>Moves the refcount table to a larger one at the end of the file (QEMU's qcow2_grow_reftable order).</summary>
    private void Grow(ulong minEntries)
    {
        int perCluster = _clusterSize / 8;
        ulong newLength = Math.Max(minEntries, (ulong)_table.Length * 2);
        ulong start = (_file.End >> _clusterBits) + 1; // first cluster of the new table
        ulong clusters;
        while (true)
        {
            newLength = (newLength + (ulong)perCluster - 1) / (ulong)perCluster * (ulong)perCluster;
            clusters = newLength / (ulong)perCluster;
            // The new table must also cover itself and the refcount blocks created for it.
            if ((newLength << _blockBits) > start + clusters + 4) break;
            newLength += (ulong)perCluster;
        }
        if (newLength * 8 > Qcow2Const.MaxRefTableBytes)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, _file.Path, "refcount table would exceed 8 MiB", -1);
        var newTable = new ulong[newLength];
        Array.Copy(_table, newTable, _table.Length);
        ulong oldOffset = _tableOffset;
        ulong oldClusters = ((ulong)_table.Length * 8 + _clusterOffsetMask) >> _clusterBits;
        Flush(); // old table on disk consistent before we switch
        _table = newTable;
        _reservedStart = start;
        _reservedEnd = start + clusters;
        _file.ExtendTo((start + clusters) << _clusterBits);
        for (ulong i = 0; i < clusters; i++) SetOneInExistingBlock(start + i);
        _reservedStart = _reservedEnd = 0;
        for (int i = 0; i < _blocks.Slots; i++) if (_blocks.IsDirty(i)) WriteBlock(i);
        _file.WriteTable(newTable, 0, newTable.Length, start << _clusterBits);
        _file.Sync();
        _tableOffset = start << _clusterBits;
        _dirtyMin = int.MaxValue; _dirtyMax = -1;
        _header.RefcountTableOffset = _tableOffset;
        _header.RefcountTableClusters = (uint)clusters;
        _file.WriteRefcountTableFields(_tableOffset, (uint)clusters);
        _file.Sync();
        for (ulong i = 0; i < oldClusters; i++) Set((oldOffset >> _clusterBits) + i, 0);
    }

    // ---------------------------------------------------------------- deferred frees and flush

    /// <summary>Drops one reference to each cluster of [<paramref name="hostOffset"/>, +<paramref name="length"/>)
    /// at the next <see cref="ApplyDeferredFrees"/>, once the references are gone from disk.</summary>
    public void DeferFree(ulong hostOffset, ulong length)
    {
        if (length == 0) return;
        ulong last = (hostOffset + length - 1) >> _clusterBits;
        for (ulong cluster = hostOffset >> _clusterBits; cluster <= last; cluster++) _deferredFrees.Add(cluster);
    }

    /// <summary>Drops one reference to the cluster at <paramref name="hostOffset"/> (see <see cref="DeferFree(ulong, ulong)"/>).</summary>
    public void DeferFree(ulong hostOffset) => _deferredFrees.Add(hostOffset >> _clusterBits);

    public bool HasDeferredFrees => _deferredFrees.Count > 0;

    /// <summary>Applies the deferred decrements. The caller has written every table that referenced the
    /// clusters; the fsync here makes that durable before any count drops.</summary>
    public void ApplyDeferredFrees()
    {
        _file.Sync(); // references are gone from disk before the refcounts drop
        foreach (ulong cluster in _deferredFrees)
        {
            ulong refcount = Get(cluster);
            if (refcount > 0) Set(cluster, refcount - 1);
        }
        _deferredFrees.Clear();
        Flush();
    }

    /// <summary>Writes dirty refcount blocks, then the changed refcount-table entries.</summary>
    public void Flush()
    {
        for (int i = 0; i < _blocks.Slots; i++) if (_blocks.IsDirty(i)) WriteBlock(i);
        if (_dirtyMax >= 0)
        {
            _file.WriteTable(_table, _dirtyMin, _dirtyMax + 1, _tableOffset);
            _dirtyMin = int.MaxValue; _dirtyMax = -1;
        }
    }
}
