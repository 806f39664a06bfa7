using Microsoft.Win32.SafeHandles;

namespace KvmSharp.Images.Qcow2;

/// <summary>
/// A qcow2 (v2/v3) image as a block device, following QEMU docs/interop/qcow2.txt.
/// <para>Crash safety (kill -9 or power loss): data clusters are written first, then refcount blocks,
/// then (after fsync) L2 tables, then (after fsync) L1 entries; refcount decrements are applied only
/// after the references are gone from disk. So the image on disk never references a cluster whose
/// refcount is not yet written, nor unwritten data; a crash leaves at most leaked clusters.</para>
/// <para>Thread safety: one lock around every operation. No allocation per request except when
/// decompressing compressed clusters through DeflateStream.</para>
/// <para>This file holds the data path (read, write, zeroes, flush) and the L1/L2 lookup; the file I/O is
/// <see cref="Qcow2File"/>, refcounts and allocation <see cref="RefcountTable"/>, compression
/// <see cref="CompressedClusterCodec"/>, L2 entries <see cref="L2Entry"/>. Partial files: block status
/// (map), introspection (check, info, snapshots) and the maintenance operations of <c>img</c>
/// (resize, compressed writes, unmapping, header rewrites).</para>
/// </summary>
public sealed partial class Qcow2Image : IBlockDevice
{
    private readonly object _lock = new();
    private readonly Qcow2File _file;
    private readonly string _path;
    internal readonly Qcow2Header Header;
    private readonly int _clusterBits;
    private readonly int _clusterSize;
    private readonly ulong _clusterOffsetMask; // cluster size - 1: the offset within a cluster
    private readonly int _l2Bits;              // log2(entries per L2 table)
    private readonly int _l2Entries;
    private readonly bool _extendedL2;         // qcow2.txt "Extended L2 Entries": 16-byte entries with subclusters
    private readonly bool _version3;           // zero flag allowed (qcow2.txt "Standard Cluster Descriptor", bit 0)
    private ulong[] _l1;
    private ulong _l1Offset;
    private int _l1DirtyMin = int.MaxValue, _l1DirtyMax = -1;
    private readonly RefcountTable _refcounts;
    private readonly MetadataCache _l2Cache;
    private readonly CompressedClusterCodec _codec;
    private readonly byte[] _cow;               // one cluster being assembled for copy on write
    private bool _headerDirtyForOpen;
    private bool _disposed;

    public ulong Size { get; private set; }
    public bool ReadOnly { get; }
    public string Path => _path;
    /// <summary>The image below this one in the chain, or null. Owned (disposed) by this image.</summary>
    public IBlockDevice? Backing { get; internal set; }
    public int ClusterSize => _clusterSize;

    internal Qcow2Image(SafeFileHandle file, string path, Qcow2Header h, bool readOnly, bool allowCorrupt = false)
    {
        _file = new Qcow2File(file, path, h.ClusterSize);
        _path = path;
        Header = h;
        ReadOnly = readOnly;
        _clusterBits = h.ClusterBits;
        _clusterSize = h.ClusterSize;
        _clusterOffsetMask = (ulong)_clusterSize - 1;
        _extendedL2 = h.ExtendedL2;
        _l2Bits = h.L2Bits;
        _l2Entries = 1 << _l2Bits;
        _version3 = h.Version >= 3;
        Size = h.Size;

        _l1Offset = h.L1TableOffset;
        _l1 = new ulong[h.L1Size];
        if (h.L1Size > 0) _file.ReadTable(_l1, _l1Offset, "L1 table");
        _refcounts = new RefcountTable(_file, h);

        // Cache budget: 4 MiB of L2 tables (32 GiB of disk at 64 KiB clusters).
        _l2Cache = new MetadataCache(Math.Clamp((4 << 20) / _clusterSize, 4, 1024), _clusterSize);
        _cow = new byte[_clusterSize];
        _codec = new CompressedClusterCodec(h.CompressionType, _clusterSize);

        // As qemu's qcow2_open (qcow2_read_snapshots): an image whose snapshot table is invalid
        // (extra_data_size over 1024, entries past the end of the file) is refused by every command.
        if (h.NbSnapshots > 0) Qcow2Snapshots.Read(this, out _, validateOnly: true);

        if (!readOnly)
        {
            if ((h.Incompatible & Qcow2Const.IncompatCorrupt) != 0 && !allowCorrupt)
                ThrowHelper.Throw(ImageErrorKind.Corrupt, path, "image is marked corrupt; open it read-only or repair it with 'check -r all'", Qcow2Header.Field.IncompatibleFeatures);
            // qcow2.txt "autoclear_features": a writer that does not maintain a feature clears its bit.
            // We do not update bitmaps, so they become invalid (bit 0); unknown bits are cleared too.
            ulong keep = h.Autoclear & Qcow2Const.AutoclearDataFileRaw;
            if (keep != h.Autoclear)
            {
                h.Autoclear = keep;
                _headerDirtyForOpen = true;
            }
        }
    }

    internal void FinishOpen()
    {
        if (_headerDirtyForOpen)
        {
            _file.WriteHeaderField(Qcow2Header.Field.AutoclearFeatures, Header.Autoclear);
            _headerDirtyForOpen = false;
        }
    }

    /// <summary>cache=unsafe (qemu-img convert's default for the target): no fsync at all. Ordering of
    /// writes is kept, so a killed process still leaves only leaks; a power loss may lose more.</summary>
    internal bool NoSync { get => _file.NoSync; set => _file.NoSync = value; }

    private ulong ClusterOf(ulong offset) => offset >> _clusterBits;
    private int OffsetInCluster(ulong offset) => (int)(offset & _clusterOffsetMask);
    private int L2Index(ulong virtualCluster) => (int)(virtualCluster & (ulong)(_l2Entries - 1));

    // ---------------------------------------------------------------- public device API

    /// <summary>Unlocked data reads in flight. Refcount decrements wait until it is zero, so a cluster
    /// being read outside the lock cannot be freed and reused under the reader.</summary>
    private int _inflight;

    /// <remarks>Mapping lookups run under the lock; the pread of allocated data and reads of the backing
    /// file run outside it, so parallel readers overlap their copies.</remarks>
    public int Read(Span<byte> buffer, ulong offset)
    {
        CheckRange(offset, (ulong)buffer.Length);
        int total = buffer.Length;
        while (buffer.Length > 0)
        {
            ClusterMapping mapping;
            int n;
            ulong host;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                mapping = PlanRead(buffer.Length, offset, out host, out n);
                if (mapping == ClusterMapping.Allocated) _inflight++;
                else if (mapping != ClusterMapping.Backing) ReadCore(buffer[..n], offset);
            }
            if (mapping == ClusterMapping.Allocated)
            {
                try { _file.Read(buffer[..n], host); }
                finally { Interlocked.Decrement(ref _inflight); }
            }
            else if (mapping == ClusterMapping.Backing) ReadBacking(buffer[..n], offset);
            buffer = buffer[n..];
            offset += (ulong)n;
        }
        return total;
    }

    /// <summary>How to read up to <paramref name="length"/> bytes at <paramref name="offset"/>:
    /// <see cref="ClusterMapping.Allocated"/>: pread <paramref name="n"/> bytes at <paramref name="host"/>
    /// (host-contiguous clusters merged); <see cref="ClusterMapping.Backing"/>: read <paramref name="n"/>
    /// bytes from the backing file; anything else: <see cref="ReadCore"/> reads them under the lock.</summary>
    private ClusterMapping PlanRead(int length, ulong offset, out ulong host, out int n)
    {
        ulong virtualCluster = ClusterOf(offset);
        int offsetInCluster = OffsetInCluster(offset);
        n = Math.Min(length, _clusterSize - offsetInCluster);
        host = 0;
        if (_extendedL2) return ClusterMapping.Subclusters;
        L2Entry entry = LookupEntry(virtualCluster);
        if (entry.IsCompressed) return ClusterMapping.Compressed; // ReadCore decides
        if (entry.ZeroFlag) return ClusterMapping.Zero;           // ReadCore decides (refused in version 2)
        ulong hostCluster = entry.HostOffset;
        if (hostCluster == 0) return Backing is null ? ClusterMapping.Unallocated : ClusterMapping.Backing;
        CheckDataOffset(hostCluster, virtualCluster);
        n = ContiguousLength(virtualCluster, hostCluster, length, n);
        host = hostCluster + (ulong)offsetInCluster;
        return ClusterMapping.Allocated;
    }

    /// <summary>Extends a read of <paramref name="n"/> bytes in <paramref name="virtualCluster"/> (at
    /// <paramref name="hostCluster"/>) over the following clusters of the same L2 table that follow it on
    /// the host too, up to <paramref name="length"/> bytes: one pread instead of one per cluster.</summary>
    private int ContiguousLength(ulong virtualCluster, ulong hostCluster, int length, int n)
    {
        int total = n;
        ulong nextHost = hostCluster + (ulong)_clusterSize;
        ulong next = virtualCluster + 1;
        while (total < length && L2Index(next) != 0)
        {
            L2Entry entry = LookupEntry(next);
            if (entry.IsCompressed || entry.ZeroFlag || entry.HostOffset != nextHost) break;
            total += Math.Min(length - total, _clusterSize);
            nextHost += (ulong)_clusterSize;
            next++;
        }
        return total;
    }

    public void Write(ReadOnlySpan<byte> data, ulong offset)
    {
        if (ReadOnly) ThrowHelper.Throw(ImageErrorKind.ReadOnly, _path, "image is opened read-only");
        CheckRange(offset, (ulong)data.Length);
        // Whole clusters that need fresh allocation are gathered into runs of host-contiguous
        // clusters and written with one pwrite; their L2 entries are set only after the data is
        // written (crash safety: no reference to unwritten data). Writes into clusters we own
        // (COPIED) pwrite outside the lock, counted in _inflight so no cluster is freed under them.
        ReadOnlySpan<byte> run = default;
        ulong runHost = 0, runFirstCluster = 0;
        int runCount = 0;
        while (data.Length > 0)
        {
            int offsetInCluster = OffsetInCluster(offset);
            int n = Math.Min(data.Length, _clusterSize - offsetInCluster);
            ulong virtualCluster = ClusterOf(offset);
            ulong inPlaceHost = 0;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                if (n == _clusterSize && NeedsFreshCluster(virtualCluster))
                {
                    ulong newHost = _refcounts.AllocateCluster();
                    if (runCount > 0 && newHost == runHost + (ulong)runCount * (ulong)_clusterSize && runCount < MaxRunClusters)
                    {
                        run = ExtendRun(run, n);
                        runCount++;
                    }
                    else
                    {
                        FinishRun(run, runHost, runFirstCluster, runCount);
                        run = data[..n];
                        runHost = newHost;
                        runFirstCluster = virtualCluster;
                        runCount = 1;
                    }
                }
                else
                {
                    FinishRun(run, runHost, runFirstCluster, runCount);
                    runCount = 0;
                    inPlaceHost = PlanInPlaceWrite(virtualCluster, offsetInCluster, n);
                    if (inPlaceHost != 0)
                    {
                        _inflight++;
                        _file.NoteWritten(inPlaceHost + (ulong)n); // bookkeeping under the lock, before the write
                    }
                    else WriteChunk(data[..n], offset);
                }
            }
            if (inPlaceHost != 0)
            {
                try { _file.WriteInPlace(data[..n], inPlaceHost); }
                finally { Interlocked.Decrement(ref _inflight); }
            }
            data = data[n..];
            offset += (ulong)n;
        }
        if (runCount > 0)
        {
            lock (_lock) FinishRun(run, runHost, runFirstCluster, runCount);
        }
    }

    /// <summary>Host offset for writing [offsetInCluster, +n) of <paramref name="virtualCluster"/> in place,
    /// or 0 when the write needs the locked path (allocation, copy on write, zero or partial subclusters).</summary>
    private ulong PlanInPlaceWrite(ulong virtualCluster, int offsetInCluster, int n)
    {
        int slot = GetL2ForWrite(virtualCluster >> _l2Bits);
        L2Entry entry = L2Entry.Read(_l2Cache.Span(slot), L2Index(virtualCluster), _extendedL2);
        if (!entry.IsOwnedHostCluster) return 0;
        if (_extendedL2 ? !SubclustersAllocated(entry, offsetInCluster, n) : _version3 && entry.ZeroFlag) return 0;
        ulong host = entry.HostOffset;
        CheckDataOffset(host, virtualCluster);
        CheckNotMetadata(host, virtualCluster);
        if (host + (ulong)_clusterSize > _file.End)
            MarkCorruptAndThrow($"L2 entry for cluster {virtualCluster} points past the end of the file (0x{host:x})", host);
        return host + (ulong)offsetInCluster;
    }

    /// <summary>Runs are capped so one pwrite stays moderate (2 MiB or one cluster).</summary>
    private int MaxRunClusters => Math.Max(1, (2 << 20) / _clusterSize);

    // The run is a slice of the caller's data and the next chunk follows it directly in that same
    // span, so the extended span stays inside the caller's buffer.
    private static ReadOnlySpan<byte> ExtendRun(ReadOnlySpan<byte> run, int n)
        => System.Runtime.InteropServices.MemoryMarshal.CreateReadOnlySpan(
            ref System.Runtime.InteropServices.MemoryMarshal.GetReference(run), run.Length + n);

    /// <summary>True when a whole-cluster write to <paramref name="virtualCluster"/> goes to a new cluster.</summary>
    private bool NeedsFreshCluster(ulong virtualCluster)
    {
        int slot = GetL2ForWrite(virtualCluster >> _l2Bits);
        return !L2Entry.Read(_l2Cache.Span(slot), L2Index(virtualCluster), _extendedL2).IsOwnedHostCluster;
    }

    /// <summary>Writes a run of fresh clusters, then points their L2 entries at them (data before references).</summary>
    private void FinishRun(ReadOnlySpan<byte> run, ulong host, ulong firstCluster, int count)
    {
        if (count == 0) return;
        _file.Write(run, host);
        for (int i = 0; i < count; i++)
        {
            ulong virtualCluster = firstCluster + (ulong)i;
            int slot = GetL2ForWrite(virtualCluster >> _l2Bits);
            int index = L2Index(virtualCluster);
            L2Entry old = L2Entry.Read(_l2Cache.Span(slot), index, _extendedL2);
            SetEntry(slot, index, L2Entry.OwnedCluster(host + (ulong)i * (ulong)_clusterSize, _extendedL2));
            DeferFreeClusterOf(old);
        }
    }

    public void Flush()
    {
        if (ReadOnly) return;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            FlushMetadata();
            _file.Sync();
        }
    }

    public void Discard(ulong offset, ulong length) => WriteZeroes(offset, length);

    public void WriteZeroes(ulong offset, ulong length)
    {
        if (ReadOnly) ThrowHelper.Throw(ImageErrorKind.ReadOnly, _path, "image is opened read-only");
        CheckRange(offset, length);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            int l1Shift = _clusterBits + _l2Bits;
            while (length > 0)
            {
                ulong l1Index = offset >> l1Shift;
                if (Backing is null && (l1Index >= (ulong)_l1.Length || (_l1[l1Index] & Qcow2Const.OffsetMask) == 0))
                {
                    // No L2 table and nothing below: the whole L1 range reads as zeros already (one step, not one per cluster).
                    ulong skip = Math.Min(((l1Index + 1) << l1Shift) - offset, length);
                    offset += skip;
                    length -= skip;
                    continue;
                }
                int offsetInCluster = OffsetInCluster(offset);
                int n = (int)Math.Min(length, (ulong)(_clusterSize - offsetInCluster));
                if (n == _clusterSize || offset + (ulong)n == Size && offsetInCluster == 0) ZeroCluster(ClusterOf(offset));
                else WriteChunk(ZeroBuffer.Span[..n], offset);
                offset += (ulong)n;
                length -= (ulong)n;
            }
        }
    }

    private void CheckRange(ulong offset, ulong length)
    {
        ulong end = offset + length;
        if (end < offset || end > Size)
            ThrowHelper.Throw(ImageErrorKind.OutOfBounds, _path, $"request {offset}+{length} beyond disk size {Size}", (long)Math.Min(offset, long.MaxValue));
    }

    // ---------------------------------------------------------------- L1/L2 lookup

    private ulong ValidL2Offset(ulong l1Entry, ulong l1Index)
    {
        ulong offset = l1Entry & Qcow2Const.OffsetMask;
        if (offset != 0 && ((offset & _clusterOffsetMask) != 0 || offset + (ulong)_clusterSize > _file.End))
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"L1 entry {l1Index} points to invalid L2 table offset 0x{offset:x}", (long)(_l1Offset + l1Index * 8));
        return offset;
    }

    private int LoadL2(ulong l2Offset)
    {
        int slot = _l2Cache.Find(l2Offset);
        if (slot >= 0) return slot;
        slot = _l2Cache.Victim();
        if (_l2Cache.IsDirty(slot)) FlushMetadata(); // writes back in crash-safe order; slot is clean after
        _file.ReadMetadata(_l2Cache.Span(slot), l2Offset, "L2 table");
        _l2Cache.Assign(slot, l2Offset);
        return slot;
    }

    /// <summary>The L2 entry of <paramref name="virtualCluster"/>; all zeros (unallocated) without an L2 table.</summary>
    private L2Entry LookupEntry(ulong virtualCluster)
    {
        ulong l1Index = virtualCluster >> _l2Bits;
        if (l1Index >= (ulong)_l1.Length) return default;
        ulong l2Offset = ValidL2Offset(_l1[l1Index], l1Index);
        if (l2Offset == 0) return default;
        return L2Entry.Read(_l2Cache.Span(LoadL2(l2Offset)), L2Index(virtualCluster), _extendedL2);
    }

    private void CheckDataOffset(ulong host, ulong virtualCluster)
    {
        if ((host & _clusterOffsetMask) != 0 || host < (ulong)_clusterSize && host != 0)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"L2 entry for cluster {virtualCluster} has invalid data offset 0x{host:x}", (long)host);
    }

    /// <summary>Returns a cache slot holding a writable (COPIED) L2 table for L1 index <paramref name="l1Index"/>.</summary>
    private int GetL2ForWrite(ulong l1Index)
    {
        ulong l1Entry = _l1[l1Index];
        ulong l2Offset = ValidL2Offset(l1Entry, l1Index);
        if (l2Offset != 0 && (l1Entry & Qcow2Const.CopiedFlag) != 0)
        {
            if (l2Offset < (ulong)_clusterSize) MarkCorruptAndThrow($"L1 entry {l1Index} points into the header", l2Offset);
            return LoadL2(l2Offset);
        }
        // New L2 table (or copy of a shared one). Read the old content before allocating.
        ulong newL2Offset = _refcounts.AllocateCluster();
        int slot = _l2Cache.Victim();
        if (_l2Cache.IsDirty(slot)) FlushMetadata();
        var table = _l2Cache.Span(slot);
        if (l2Offset != 0)
        {
            _file.ReadMetadata(table, l2Offset, "L2 table");
            _refcounts.DeferFree(l2Offset);
        }
        else table.Clear();
        _l2Cache.Assign(slot, newL2Offset);
        _l2Cache.MarkDirty(slot);
        _l1[l1Index] = newL2Offset | Qcow2Const.CopiedFlag;
        _l1DirtyMin = Math.Min(_l1DirtyMin, (int)l1Index);
        _l1DirtyMax = Math.Max(_l1DirtyMax, (int)l1Index);
        return slot;
    }

    private void SetEntry(int slot, int index, L2Entry entry)
    {
        entry.WriteTo(_l2Cache.Span(slot), index, _extendedL2);
        _l2Cache.MarkDirty(slot);
    }

    /// <summary>Drops (at the next flush) this image's reference to the host cluster(s) an entry being
    /// replaced pointed at.</summary>
    private void DeferFreeClusterOf(L2Entry old)
    {
        if (old.IsCompressed) _refcounts.DeferFree(old.CompressedHostOffset(_clusterBits), (ulong)CompressedLength(old));
        else if (old.HostOffset != 0) _refcounts.DeferFree(old.HostOffset);
    }

    // ---------------------------------------------------------------- read

    private void ReadCore(Span<byte> dst, ulong offset)
    {
        while (dst.Length > 0)
        {
            ulong virtualCluster = ClusterOf(offset);
            int offsetInCluster = OffsetInCluster(offset);
            int n = Math.Min(dst.Length, _clusterSize - offsetInCluster);
            L2Entry entry = LookupEntry(virtualCluster);
            if (entry.IsCompressed)
            {
                ReadCompressed(entry, dst[..n], offsetInCluster, virtualCluster);
            }
            else if (_extendedL2)
            {
                ReadSubclusters(entry, dst[..n], offset, offsetInCluster, virtualCluster);
            }
            else
            {
                ulong host = entry.HostOffset;
                if (entry.ZeroFlag && !_version3)
                    ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"Zero cluster entry found in pre-v3 image (cluster {virtualCluster})", -1);
                if (entry.ZeroFlag) dst[..n].Clear();
                else if (host == 0) ReadBacking(dst[..n], offset);
                else
                {
                    CheckDataOffset(host, virtualCluster);
                    n = ContiguousLength(virtualCluster, host, dst.Length, n);
                    _file.Read(dst[..n], host + (ulong)offsetInCluster);
                }
            }
            dst = dst[n..];
            offset += (ulong)n;
        }
    }

    private void ReadBacking(Span<byte> dst, ulong offset)
    {
        var backing = Backing;
        if (backing is null) { dst.Clear(); return; }
        ulong backingSize = backing.Size;
        if (offset >= backingSize) { dst.Clear(); return; }
        int n = (int)Math.Min((ulong)dst.Length, backingSize - offset);
        backing.Read(dst[..n], offset);
        dst[n..].Clear();
    }

    private void ReadSubclusters(L2Entry entry, Span<byte> dst, ulong offset, int offsetInCluster, ulong virtualCluster)
    {
        // qcow2.txt "Extended L2 Entries": 32 subclusters; bit x = allocated, bit 32+x = reads as zeros.
        ulong host = entry.HostOffset;
        if (host != 0) CheckDataOffset(host, virtualCluster);
        int subclusterSize = _clusterSize / L2Entry.SubclustersPerCluster;
        while (dst.Length > 0)
        {
            int subcluster = offsetInCluster / subclusterSize;
            int n = Math.Min(dst.Length, (subcluster + 1) * subclusterSize - offsetInCluster);
            bool allocated = entry.IsSubclusterAllocated(subcluster);
            bool zero = entry.IsSubclusterZero(subcluster);
            if (allocated && zero)
                ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"subcluster {subcluster} of cluster {virtualCluster} is both allocated and zero", -1);
            if (allocated)
            {
                if (host == 0) ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"allocated subcluster {subcluster} of cluster {virtualCluster} has no host cluster", -1);
                _file.Read(dst[..n], host + (ulong)offsetInCluster);
            }
            else if (zero) dst[..n].Clear();
            else ReadBacking(dst[..n], offset);
            dst = dst[n..];
            offset += (ulong)n;
            offsetInCluster += n;
        }
    }

    /// <summary>Bytes the compressed data of <paramref name="entry"/> may occupy, capped at what the codec's buffer holds.</summary>
    private int CompressedLength(L2Entry entry)
        => (int)Math.Min(entry.CompressedLength(_clusterBits), (ulong)CompressedClusterCodec.MaxCompressedLength(_clusterSize));

    private void ReadCompressed(L2Entry entry, Span<byte> dst, int offsetInCluster, ulong virtualCluster)
    {
        if (!_codec.TryGetCached(entry.Raw, out ReadOnlySpan<byte> cluster))
        {
            ulong hostOffset = entry.CompressedHostOffset(_clusterBits);
            int length = CompressedLength(entry);
            if (hostOffset + (ulong)length > _file.End)
            {
                if (hostOffset >= _file.End)
                    ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"compressed cluster {virtualCluster} lies beyond the end of the file", (long)Math.Min(hostOffset, long.MaxValue));
                length = (int)(_file.End - hostOffset); // QEMU also trims the last sector at EOF
            }
            var compressed = _codec.CompressedBuffer[..length];
            _file.Read(compressed, hostOffset);
            if (!_codec.DecompressToCache(compressed, entry.Raw))
                ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"compressed cluster {virtualCluster} does not decompress", (long)hostOffset);
            _codec.TryGetCached(entry.Raw, out cluster);
        }
        cluster.Slice(offsetInCluster, dst.Length).CopyTo(dst);
    }

    // ---------------------------------------------------------------- write

    private void WriteChunk(ReadOnlySpan<byte> data, ulong offset)
    {
        ulong virtualCluster = ClusterOf(offset);
        int offsetInCluster = OffsetInCluster(offset);
        int slot = GetL2ForWrite(virtualCluster >> _l2Bits);
        int index = L2Index(virtualCluster);
        L2Entry entry = L2Entry.Read(_l2Cache.Span(slot), index, _extendedL2);
        ulong host = entry.HostOffset;
        if (entry.IsOwnedHostCluster)
        {
            CheckDataOffset(host, virtualCluster);
            CheckNotMetadata(host, virtualCluster);
            if (host + (ulong)_clusterSize > _file.End)
                MarkCorruptAndThrow($"L2 entry for cluster {virtualCluster} points past the end of the file (0x{host:x})", host);
            bool inPlace = _extendedL2 ? SubclustersAllocated(entry, offsetInCluster, data.Length) : !(_version3 && entry.ZeroFlag);
            if (inPlace)
            {
                _file.Write(data, host + (ulong)offsetInCluster);
                return;
            }
            // Zero-flagged preallocated cluster or partly allocated subclusters: materialise the whole
            // cluster in place; the host cluster is ours (COPIED), nothing else references it.
            FillCow(virtualCluster, offsetInCluster, data.Length);
            data.CopyTo(_cow.AsSpan(offsetInCluster));
            _file.Write(_cow, host);
            SetEntry(slot, index, L2Entry.OwnedCluster(host, _extendedL2));
            return;
        }
        // Copy on write into a fresh cluster: the backing data, zeros, or the old shared/compressed cluster.
        ReadOnlySpan<byte> payload = data;
        ulong writeAt = (ulong)offsetInCluster;
        ulong newHost = _refcounts.AllocateCluster();
        if (data.Length < _clusterSize)
        {
            bool zeroCow = host == 0 && !entry.IsCompressed
                && (Backing is null || !_extendedL2 && _version3 && entry.ZeroFlag);
            // A cluster past everything written so far is a hole in the file and reads as zeros already;
            // then only the data needs writing (QEMU gets the same effect with write-zeroes).
            if (!(zeroCow && newHost >= _file.WrittenEnd))
            {
                FillCow(virtualCluster, offsetInCluster, data.Length);
                data.CopyTo(_cow.AsSpan(offsetInCluster));
                payload = _cow;
                writeAt = 0;
            }
        }
        _file.Write(payload, newHost + writeAt);
        // Allocation and the copy-on-write reads may have evicted the table: find its slot again.
        slot = GetL2ForWrite(virtualCluster >> _l2Bits);
        SetEntry(slot, index, L2Entry.OwnedCluster(newHost, _extendedL2));
        DeferFreeClusterOf(entry);
    }

    private bool SubclustersAllocated(L2Entry entry, int offsetInCluster, int length)
    {
        // qcow2.txt "Extended L2 Entries": a cluster has 32 subclusters; the write may touch several.
        int subclusterSize = _clusterSize / L2Entry.SubclustersPerCluster;
        int first = offsetInCluster / subclusterSize, last = (offsetInCluster + length - 1) / subclusterSize;
        ulong mask = (last == 31 ? L2Entry.AllSubclustersAllocated : (1UL << (last + 1)) - 1) & ~((1UL << first) - 1);
        return (entry.SubclusterBitmap & mask) == mask;
    }

    /// <summary>Fills _cow with the cluster's current content outside [offsetInCluster, +length).</summary>
    private void FillCow(ulong virtualCluster, int offsetInCluster, int length)
    {
        ulong start = virtualCluster << _clusterBits;
        int valid = (int)Math.Min((ulong)_clusterSize, Size - start);
        var head = _cow.AsSpan(0, Math.Min(offsetInCluster, valid));
        if (head.Length > 0) ReadCore(head, start);
        int tailStart = offsetInCluster + length;
        if (tailStart < valid) ReadCore(_cow.AsSpan(tailStart, valid - tailStart), start + (ulong)tailStart);
        if (valid < _clusterSize) _cow.AsSpan(Math.Max(valid, tailStart)).Clear();
    }

    private void CheckNotMetadata(ulong host, ulong virtualCluster)
    {
        // QEMU's "overlap check" for the cheap, always-known structures: header, L1, refcount table.
        ulong end = host + (ulong)_clusterSize;
        bool bad = host < (ulong)_clusterSize
            || Overlaps(host, end, _l1Offset, (ulong)_l1.Length * 8)
            || Overlaps(host, end, _refcounts.TableOffset, (ulong)_refcounts.Table.Length * 8);
        if (bad) MarkCorruptAndThrow($"L2 entry for cluster {virtualCluster} points into metadata at 0x{host:x}", host);
    }

    private static bool Overlaps(ulong a, ulong aEnd, ulong b, ulong length) => length != 0 && a < b + length && b < aEnd;

    private void MarkCorruptAndThrow(string message, ulong offset)
    {
        if (_version3 && !ReadOnly)
        {
            Header.Incompatible |= Qcow2Const.IncompatCorrupt;
            try { _file.WriteHeaderField(Qcow2Header.Field.IncompatibleFeatures, Header.Incompatible); _file.Sync(); } catch (ImageException) { }
        }
        ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, message + "; image marked corrupt", (long)Math.Min(offset, long.MaxValue));
    }

    private void ZeroCluster(ulong virtualCluster)
    {
        ulong l1Index = virtualCluster >> _l2Bits;
        bool needRecord = Backing is not null;
        if (!needRecord && (_l1[l1Index] & Qcow2Const.OffsetMask) == 0) return; // unallocated already reads zero
        if (!_version3 && Backing is not null)
        {
            // v2 has no zero flag: zeros must be written as data.
            int n = (int)Math.Min((ulong)_clusterSize, Size - (virtualCluster << _clusterBits));
            WriteChunk(ZeroBuffer.Span[..n], virtualCluster << _clusterBits);
            return;
        }
        int slot = GetL2ForWrite(l1Index);
        int index = L2Index(virtualCluster);
        DeferFreeClusterOf(L2Entry.Read(_l2Cache.Span(slot), index, _extendedL2));
        if (_extendedL2) SetEntry(slot, index, new L2Entry(0, L2Entry.AllSubclustersZero));
        else SetEntry(slot, index, new L2Entry(_version3 ? Qcow2Const.ZeroFlag : 0));
    }

    // ---------------------------------------------------------------- flush

    /// <summary>
    /// Writes dirty metadata in the crash-safe order: refcounts → fsync → L2 tables → fsync → L1 → frees.
    /// </summary>
    internal void FlushMetadata()
    {
        if (ReadOnly) return;
        bool references = _l2Cache.DirtyCount > 0 || _l1DirtyMax >= 0;
        _refcounts.Flush();
        if (references)
        {
            _file.Sync(); // data clusters and their refcounts are durable before anything points to them
            if (_l2Cache.DirtyCount > 0)
            {
                for (int i = 0; i < _l2Cache.Slots; i++)
                {
                    if (!_l2Cache.IsDirty(i)) continue;
                    _file.Write(_l2Cache.Span(i), _l2Cache.OffsetOf(i));
                    _l2Cache.MarkClean(i);
                }
            }
            if (_l1DirtyMax >= 0)
            {
                _file.Sync(); // new L2 tables are on disk before L1 names them
                _file.WriteTable(_l1, _l1DirtyMin, _l1DirtyMax + 1, _l1Offset);
                _l1DirtyMin = int.MaxValue; _l1DirtyMax = -1;
            }
        }
        if (_refcounts.HasDeferredFrees && Volatile.Read(ref _inflight) == 0)
        {
            _codec.ForgetCached(); // the freed clusters may be reused
            _refcounts.ApplyDeferredFrees(); // fsyncs first: references are gone from disk before the refcounts drop
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            try
            {
                if (!ReadOnly) { FlushMetadata(); _file.Sync(); }
            }
            finally
            {
                _disposed = true;
                _file.Dispose();
                _codec.Dispose();
                Backing?.Dispose();
            }
        }
    }
}
