using System.Buffers.Binary;
using System.IO.Compression;
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
/// </summary>
public sealed class Qcow2Image : IBlockDevice
{
    private readonly object _lock = new();
    private readonly SafeFileHandle _file;
    private readonly string _path;
    internal readonly Qcow2Header Header;
    private readonly int _cb;          // cluster bits
    private readonly int _cs;          // cluster size
    private readonly ulong _cmask;     // cs - 1
    private readonly int _l2Bits;
    private readonly int _l2Entries;
    private readonly int _entrySize;   // 8, or 16 with extended L2 (qcow2.txt "Extended L2 Entries")
    private readonly bool _ext;
    private readonly bool _v3;
    private readonly int _rcOrder;
    private readonly int _rbBits;      // log2(refcounts per refcount block)
    private ulong[] _l1;
    private ulong _l1Offset;
    private int _l1DirtyMin = int.MaxValue, _l1DirtyMax = -1;
    private ulong[] _rcTable;
    private ulong _rcTableOffset;
    private int _rcDirtyMin = int.MaxValue, _rcDirtyMax = -1;
    private readonly MetadataCache _l2;
    private readonly MetadataCache _rb;
    private readonly byte[] _cow;
    private readonly byte[] _scratch;
    private readonly byte[] _compBuf;
    private readonly byte[] _decomp;
    private ulong _decompKey = ulong.MaxValue;
    private ZstdSharp.Decompressor? _zstd;
    private readonly List<ulong> _pendingFree = new(256);
    private ulong _freeHint;
    private ulong _fileEnd;            // bytes; max of file length and everything we allocated
    private ulong _physEnd;            // bytes actually written: beyond it the file is a hole (reads zero)
    private ulong _reservedStart, _reservedEnd; // cluster indices kept free while the refcount table moves
    private RefcountMap? _repairInUse; // during repair: clusters referenced by metadata, never allocated
    private bool _headerDirtyForOpen;
    private bool _disposed;

    public ulong Size { get; private set; }
    public bool ReadOnly { get; }
    public string Path => _path;
    /// <summary>The image below this one in the chain, or null. Owned (disposed) by this image.</summary>
    public IBlockDevice? Backing { get; internal set; }
    public int ClusterSize => _cs;

    internal Qcow2Image(SafeFileHandle file, string path, Qcow2Header h, bool readOnly, bool allowCorrupt = false)
    {
        _file = file;
        _path = path;
        Header = h;
        ReadOnly = readOnly;
        _cb = h.ClusterBits;
        _cs = h.ClusterSize;
        _cmask = (ulong)_cs - 1;
        _ext = h.ExtendedL2;
        _entrySize = h.L2EntrySize;
        _l2Bits = h.L2Bits;
        _l2Entries = 1 << _l2Bits;
        _v3 = h.Version >= 3;
        _rcOrder = h.RefcountOrder;
        _rbBits = _cb + 3 - _rcOrder;
        Size = h.Size;
        long flen = RandomAccess.GetLength(file);
        _fileEnd = ((ulong)flen + _cmask) & ~_cmask;
        _physEnd = (ulong)flen;

        _l1Offset = h.L1TableOffset;
        _l1 = new ulong[h.L1Size];
        if (h.L1Size > 0) ReadTable(_l1, _l1Offset, "L1 table");
        _rcTableOffset = h.RefcountTableOffset;
        _rcTable = new ulong[((ulong)h.RefcountTableClusters << _cb) / 8];
        ReadTable(_rcTable, _rcTableOffset, "refcount table");

        // Cache budgets: 4 MiB of L2 tables (32 GiB of disk at 64 KiB clusters), 1 MiB of refcount blocks.
        _l2 = new MetadataCache(Math.Clamp((4 << 20) / _cs, 4, 1024), _cs);
        _rb = new MetadataCache(Math.Clamp((1 << 20) / _cs, 4, 256), _cs);
        _cow = new byte[_cs];
        _scratch = new byte[_cs];
        _compBuf = new byte[2 * _cs + 512];
        _decomp = new byte[_cs];

        // As qemu's qcow2_open (qcow2_read_snapshots): an image whose snapshot table is invalid
        // (extra_data_size over 1024, entries past the end of the file) is refused by every command.
        if (h.NbSnapshots > 0) Qcow2Snapshots.Read(this, out _, validateOnly: true);

        if (!readOnly)
        {
            if ((h.Incompatible & Qcow2Const.IncompatCorrupt) != 0 && !allowCorrupt)
                ThrowHelper.Throw(ImageErrorKind.Corrupt, path, "image is marked corrupt; open it read-only or repair it with 'check -r all'", 72);
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

    private void ReadTable(ulong[] table, ulong offset, string what)
    {
        byte[] buf = new byte[Math.Min(table.Length * 8L, 1 << 20)];
        int done = 0;
        while (done < table.Length)
        {
            int n = Math.Min(table.Length - done, buf.Length / 8);
            var span = buf.AsSpan(0, n * 8);
            PReadMeta(span, checked(offset + (ulong)done * 8), what);
            for (int i = 0; i < n; i++) table[done + i] = BinaryPrimitives.ReadUInt64BigEndian(span[(i * 8)..]);
            done += n;
        }
    }

    internal void FinishOpen()
    {
        if (_headerDirtyForOpen)
        {
            WriteHeaderU64(88, Header.Autoclear);
            _headerDirtyForOpen = false;
        }
    }

    // ---------------------------------------------------------------- host I/O

    private void PReadMeta(Span<byte> dst, ulong offset, string what)
    {
        ulong end = offset + (ulong)dst.Length;
        if (end < offset || offset > long.MaxValue || end > _fileEnd)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"{what} at 0x{offset:x} lies beyond the end of the file", (long)Math.Min(offset, long.MaxValue));
        PRead(dst, offset);
    }

    private void PRead(Span<byte> dst, ulong offset)
    {
        try
        {
            int done = 0;
            while (done < dst.Length)
            {
                int n = RandomAccess.Read(_file, dst[done..], (long)offset + done);
                if (n <= 0) { dst[done..].Clear(); return; } // past EOF reads as zeros, as QEMU's file driver
                done += n;
            }
        }
        catch (IOException e) { ThrowHelper.Io(_path, "read", e, (long)offset); }
    }

    private void PWrite(ReadOnlySpan<byte> src, ulong offset)
    {
        try { RandomAccess.Write(_file, src, (long)offset); }
        catch (IOException e) { ThrowHelper.Io(_path, "write", e, (long)offset); }
        ulong end = offset + (ulong)src.Length;
        if (end > _physEnd) _physEnd = end;
        if (end > _fileEnd) _fileEnd = (end + _cmask) & ~_cmask;
    }

    /// <summary>cache=unsafe (qemu-img convert's default for the target): no fsync at all. Ordering of
    /// writes is kept, so a killed process still leaves only leaks; a power loss may lose more.</summary>
    internal bool NoSync { get; set; }

    private void Sync()
    {
        if (NoSync) return;
        try { RandomAccess.FlushToDisk(_file); }
        catch (IOException e) { ThrowHelper.Io(_path, "fsync", e); }
    }

    private void WriteHeaderU64(int field, ulong v)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, v);
        PWrite(b, (ulong)field);
    }

    private void WriteHeaderU32(int field, uint v)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, v);
        PWrite(b, (ulong)field);
    }

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
            int kind, n;
            ulong host;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                kind = PlanRead(buffer.Length, offset, out host, out n);
                if (kind == 0) ReadCore(buffer[..n], offset);
                else if (kind == 1) _inflight++;
            }
            if (kind == 1)
            {
                try { PRead(buffer[..n], host); }
                finally { Interlocked.Decrement(ref _inflight); }
            }
            else if (kind == 2) ReadBacking(buffer[..n], offset);
            buffer = buffer[n..];
            offset += (ulong)n;
        }
        return total;
    }

    /// <summary>0: read <paramref name="n"/> bytes under the lock (compressed, subclusters, zero);
    /// 1: pread <paramref name="n"/> bytes at <paramref name="host"/>; 2: read them from the backing file.</summary>
    private int PlanRead(int len, ulong off, out ulong host, out int n)
    {
        ulong vc = off >> _cb;
        int inC = (int)(off & _cmask);
        n = Math.Min(len, _cs - inC);
        host = 0;
        if (_ext) return 0;
        ulong e = GetL2Entry(vc, out _);
        if ((e & Qcow2Const.CompressedFlag) != 0 || (e & Qcow2Const.ZeroFlag) != 0) return 0; // ReadCore decides
        ulong h = e & Qcow2Const.OffsetMask;
        if (h == 0) return Backing is null ? 0 : 2;
        CheckDataOffset(h, vc);
        int total = n;
        ulong nextHost = h + (ulong)_cs;
        ulong nvc = vc + 1;
        while (total < len && (nvc & (ulong)(_l2Entries - 1)) != 0)
        {
            ulong ne = GetL2Entry(nvc, out _);
            if ((ne & (Qcow2Const.CompressedFlag | Qcow2Const.ZeroFlag)) != 0 || (ne & Qcow2Const.OffsetMask) != nextHost) break;
            total += Math.Min(len - total, _cs);
            nextHost += (ulong)_cs;
            nvc++;
        }
        n = total;
        host = h + (ulong)inC;
        return 1;
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
        ulong runHost = 0, runVc = 0;
        int runCount = 0;
        while (data.Length > 0)
        {
            int inC = (int)(offset & _cmask);
            int n = Math.Min(data.Length, _cs - inC);
            ulong vc = offset >> _cb;
            ulong direct = 0;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                if (n == _cs && NeedsFreshCluster(vc))
                {
                    ulong nh = AllocateCluster();
                    if (runCount > 0 && nh == runHost + (ulong)runCount * (ulong)_cs && runCount < MaxRunClusters)
                    {
                        run = MemoryMarshalExtend(run, n);
                        runCount++;
                    }
                    else
                    {
                        FinishRun(run, runHost, runVc, runCount);
                        run = data[..n];
                        runHost = nh;
                        runVc = vc;
                        runCount = 1;
                    }
                }
                else
                {
                    FinishRun(run, runHost, runVc, runCount);
                    runCount = 0;
                    direct = PlanInPlaceWrite(vc, inC, n);
                    if (direct != 0)
                    {
                        _inflight++;
                        ulong end = direct + (ulong)n;
                        if (end > _physEnd) _physEnd = end; // bookkeeping under the lock, before the write
                    }
                    else WriteChunk(data[..n], offset);
                }
            }
            if (direct != 0)
            {
                try { RawPWrite(data[..n], direct); }
                finally { Interlocked.Decrement(ref _inflight); }
            }
            data = data[n..];
            offset += (ulong)n;
        }
        if (runCount > 0)
        {
            lock (_lock) FinishRun(run, runHost, runVc, runCount);
        }
    }

    /// <summary>Host offset for writing [inC, inC+n) of cluster <paramref name="vc"/> in place, or 0
    /// when the write needs the locked path (allocation, copy on write, zero or partial subclusters).</summary>
    private ulong PlanInPlaceWrite(ulong vc, int inC, int n)
    {
        int slot = GetL2ForWrite(vc >> _l2Bits);
        int ei = (int)(vc & (ulong)(_l2Entries - 1)) * _entrySize;
        var t = _l2.Span(slot);
        ulong e = BinaryPrimitives.ReadUInt64BigEndian(t[ei..]);
        ulong host = e & Qcow2Const.OffsetMask;
        if ((e & Qcow2Const.CompressedFlag) != 0 || host == 0 || (e & Qcow2Const.CopiedFlag) == 0) return 0;
        if (_ext ? !SubclustersAllocated(BinaryPrimitives.ReadUInt64BigEndian(t[(ei + 8)..]), inC, n)
                 : _v3 && (e & Qcow2Const.ZeroFlag) != 0) return 0;
        CheckDataOffset(host, vc);
        CheckNotMetadata(host, vc);
        if (host + (ulong)_cs > _fileEnd)
            MarkCorruptAndThrow($"L2 entry for cluster {vc} points past the end of the file (0x{host:x})", host);
        return host + (ulong)inC;
    }

    private void RawPWrite(ReadOnlySpan<byte> src, ulong offset)
    {
        try { RandomAccess.Write(_file, src, (long)offset); }
        catch (IOException e) { ThrowHelper.Io(_path, "write", e, (long)offset); }
    }

    /// <summary>Runs are capped so one pwrite stays moderate (2 MiB or one cluster).</summary>
    private int MaxRunClusters => Math.Max(1, (2 << 20) / _cs);

    // The run is a slice of the caller's data and the next chunk follows it directly in that same
    // span, so the extended span stays inside the caller's buffer.
    private static ReadOnlySpan<byte> MemoryMarshalExtend(ReadOnlySpan<byte> run, int n)
        => System.Runtime.InteropServices.MemoryMarshal.CreateReadOnlySpan(
            ref System.Runtime.InteropServices.MemoryMarshal.GetReference(run), run.Length + n);

    /// <summary>True when a whole-cluster write to <paramref name="vc"/> goes to a new cluster.</summary>
    private bool NeedsFreshCluster(ulong vc)
    {
        ulong l1i = vc >> _l2Bits;
        int slot = GetL2ForWrite(l1i);
        int ei = (int)(vc & (ulong)(_l2Entries - 1)) * _entrySize;
        ulong e = BinaryPrimitives.ReadUInt64BigEndian(_l2.Span(slot)[ei..]);
        bool copiedInPlace = (e & Qcow2Const.CompressedFlag) == 0 && (e & Qcow2Const.OffsetMask) != 0 && (e & Qcow2Const.CopiedFlag) != 0;
        return !copiedInPlace;
    }

    private void FinishRun(ReadOnlySpan<byte> run, ulong host, ulong vc, int count)
    {
        if (count == 0) return;
        PWrite(run, host);
        for (int i = 0; i < count; i++)
        {
            ulong v = vc + (ulong)i;
            int slot = GetL2ForWrite(v >> _l2Bits);
            int ei = (int)(v & (ulong)(_l2Entries - 1)) * _entrySize;
            ulong old = BinaryPrimitives.ReadUInt64BigEndian(_l2.Span(slot)[ei..]);
            SetEntry(slot, ei, (host + (ulong)i * (ulong)_cs) | Qcow2Const.CopiedFlag, _ext ? 0xffffffffUL : 0);
            if ((old & Qcow2Const.CompressedFlag) != 0) DeferFreeCompressed(old);
            else if ((old & Qcow2Const.OffsetMask) != 0) DeferFree(old & Qcow2Const.OffsetMask);
        }
    }

    public void Flush()
    {
        if (ReadOnly) return;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            FlushMetadata();
            Sync();
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
            int l1Shift = _cb + _l2Bits;
            while (length > 0)
            {
                ulong l1i = offset >> l1Shift;
                if (Backing is null && (l1i >= (ulong)_l1.Length || (_l1[l1i] & Qcow2Const.OffsetMask) == 0))
                {
                    // No L2 table and nothing below: the whole L1 range reads as zeros already (one step, not one per cluster).
                    ulong skip = Math.Min(((l1i + 1) << l1Shift) - offset, length);
                    offset += skip;
                    length -= skip;
                    continue;
                }
                int inC = (int)(offset & _cmask);
                int n = (int)Math.Min(length, (ulong)(_cs - inC));
                if (n == _cs || offset + (ulong)n == Size && inC == 0) ZeroCluster(offset >> _cb);
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

    // ---------------------------------------------------------------- lookup

    private ulong ValidL2Offset(ulong l1e, ulong l1i)
    {
        ulong off = l1e & Qcow2Const.OffsetMask;
        if (off != 0 && ((off & _cmask) != 0 || off + (ulong)_cs > _fileEnd))
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"L1 entry {l1i} points to invalid L2 table offset 0x{off:x}", (long)(_l1Offset + l1i * 8));
        return off;
    }

    private int LoadL2(ulong l2Off)
    {
        int slot = _l2.Find(l2Off);
        if (slot >= 0) return slot;
        slot = _l2.Victim();
        if (_l2.IsDirty(slot)) FlushMetadata(); // writes back in crash-safe order; slot is clean after
        PReadMeta(_l2.Span(slot), l2Off, "L2 table");
        _l2.Assign(slot, l2Off);
        return slot;
    }

    /// <summary>Standard part of the L2 entry for virtual cluster <paramref name="vc"/>, 0 if unallocated.</summary>
    internal ulong GetL2Entry(ulong vc, out ulong bitmap)
    {
        bitmap = 0;
        ulong l1i = vc >> _l2Bits;
        if (l1i >= (ulong)_l1.Length) return 0;
        ulong l2 = ValidL2Offset(_l1[l1i], l1i);
        if (l2 == 0) return 0;
        var t = _l2.Span(LoadL2(l2));
        int ei = (int)(vc & (ulong)(_l2Entries - 1)) * _entrySize;
        if (_ext) bitmap = BinaryPrimitives.ReadUInt64BigEndian(t[(ei + 8)..]);
        return BinaryPrimitives.ReadUInt64BigEndian(t[ei..]);
    }

    private void CheckDataOffset(ulong host, ulong vc)
    {
        if ((host & _cmask) != 0 || host < (ulong)_cs && host != 0)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"L2 entry for cluster {vc} has invalid data offset 0x{host:x}", (long)host);
    }

    // ---------------------------------------------------------------- read

    private void ReadCore(Span<byte> dst, ulong off)
    {
        while (dst.Length > 0)
        {
            ulong vc = off >> _cb;
            int inC = (int)(off & _cmask);
            int n = Math.Min(dst.Length, _cs - inC);
            ulong e = GetL2Entry(vc, out ulong bm);
            if ((e & Qcow2Const.CompressedFlag) != 0)
            {
                ReadCompressed(e, dst[..n], inC, vc);
            }
            else if (_ext)
            {
                ReadExtended(e, bm, dst[..n], off, inC, vc);
            }
            else
            {
                ulong host = e & Qcow2Const.OffsetMask;
                if ((e & Qcow2Const.ZeroFlag) != 0 && !_v3)
                    ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"Zero cluster entry found in pre-v3 image (cluster {vc})", -1);
                if ((e & Qcow2Const.ZeroFlag) != 0) dst[..n].Clear();
                else if (host == 0) ReadBacking(dst[..n], off);
                else
                {
                    CheckDataOffset(host, vc);
                    // Merge following clusters that are contiguous on the host into one pread.
                    int total = n;
                    ulong nextHost = host + (ulong)_cs;
                    ulong nvc = vc + 1;
                    while (total < dst.Length && (nvc & (ulong)(_l2Entries - 1)) != 0)
                    {
                        ulong ne = GetL2Entry(nvc, out _);
                        if ((ne & (Qcow2Const.CompressedFlag | Qcow2Const.ZeroFlag)) != 0 || (ne & Qcow2Const.OffsetMask) != nextHost) break;
                        total += Math.Min(dst.Length - total, _cs);
                        nextHost += (ulong)_cs;
                        nvc++;
                    }
                    n = total;
                    PRead(dst[..n], host + (ulong)inC);
                }
            }
            dst = dst[n..];
            off += (ulong)n;
        }
    }

    private void ReadBacking(Span<byte> dst, ulong off)
    {
        var b = Backing;
        if (b is null) { dst.Clear(); return; }
        ulong bs = b.Size;
        if (off >= bs) { dst.Clear(); return; }
        int n = (int)Math.Min((ulong)dst.Length, bs - off);
        b.Read(dst[..n], off);
        dst[n..].Clear();
    }

    private void ReadExtended(ulong e, ulong bm, Span<byte> dst, ulong off, int inC, ulong vc)
    {
        // qcow2.txt "Extended L2 Entries": 32 subclusters; bit x = allocated, bit 32+x = reads as zeros.
        ulong host = e & Qcow2Const.OffsetMask;
        if (host != 0) CheckDataOffset(host, vc);
        int scSize = _cs / 32;
        while (dst.Length > 0)
        {
            int sc = inC / scSize;
            int n = Math.Min(dst.Length, (sc + 1) * scSize - inC);
            bool alloc = ((bm >> sc) & 1) != 0;
            bool zero = ((bm >> (32 + sc)) & 1) != 0;
            if (alloc && zero)
                ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"subcluster {sc} of cluster {vc} is both allocated and zero", -1);
            if (alloc)
            {
                if (host == 0) ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"allocated subcluster {sc} of cluster {vc} has no host cluster", -1);
                PRead(dst[..n], host + (ulong)inC);
            }
            else if (zero) dst[..n].Clear();
            else ReadBacking(dst[..n], off);
            dst = dst[n..];
            off += (ulong)n;
            inC += n;
        }
    }

    /// <summary>qcow2.txt "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8).</summary>
    internal void DecodeCompressed(ulong e, out ulong hostOff, out int length)
    {
        int x = 62 - (_cb - 8);
        hostOff = e & ((1UL << x) - 1);
        ulong sectors = ((e & ~Qcow2Const.CompressedFlag & ~Qcow2Const.CopiedFlag) >> x) + 1;
        ulong len = sectors * 512 - (hostOff & 511);
        length = (int)Math.Min(len, (ulong)_compBuf.Length);
    }

    private void ReadCompressed(ulong e, Span<byte> dst, int inC, ulong vc)
    {
        if (_decompKey != e)
        {
            DecodeCompressed(e, out ulong hostOff, out int len);
            if (hostOff + (ulong)len > _fileEnd)
            {
                if (hostOff >= _fileEnd)
                    ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"compressed cluster {vc} lies beyond the end of the file", (long)Math.Min(hostOff, long.MaxValue));
                len = (int)(_fileEnd - hostOff); // QEMU also trims the last sector at EOF
            }
            var src = _compBuf.AsSpan(0, len);
            PRead(src, hostOff);
            _decompKey = ulong.MaxValue;
            if (!Decompress(src, _decomp))
                ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"compressed cluster {vc} does not decompress", (long)hostOff);
            _decompKey = e;
        }
        _decomp.AsSpan(inC, dst.Length).CopyTo(dst);
    }

    private bool Decompress(ReadOnlySpan<byte> src, byte[] dst)
    {
        if (Header.CompressionType == 1)
        {
            _zstd ??= new ZstdSharp.Decompressor();
            try
            {
                // The descriptor's sector rounding leaves trailing bytes after the frame; bound by frame size.
                ulong frame;
                unsafe
                {
                    // SAFETY: src is pinned for the call and its length is passed alongside.
                    fixed (byte* p = src) frame = ZstdSharp.Unsafe.Methods.ZSTD_findFrameCompressedSize(p, (nuint)src.Length);
                }
                if (ZstdSharp.Unsafe.Methods.ZSTD_isError((nuint)frame)) return false;
                int n = _zstd.Unwrap(src[..(int)frame], dst);
                return n == dst.Length;
            }
            catch (Exception e) when (e is ZstdSharp.ZstdException or ArgumentException or InvalidOperationException) { return false; }
        }
        // zlib: raw deflate (QEMU uses window bits -12). DeflateStream allocates; see README.
        try
        {
            unsafe
            {
                // SAFETY: the stream only reads within src, pinned for the duration of this block.
                fixed (byte* p = src)
                {
                    using var ms = new UnmanagedMemoryStream(p, src.Length);
                    using var ds = new DeflateStream(ms, CompressionMode.Decompress);
                    int done = 0;
                    while (done < dst.Length)
                    {
                        int r = ds.Read(dst, done, dst.Length - done);
                        if (r <= 0) break;
                        done += r;
                    }
                    return done == dst.Length;
                }
            }
        }
        catch (Exception e) when (e is InvalidDataException or IOException) { return false; }
    }

    // ---------------------------------------------------------------- write

    private void WriteChunk(ReadOnlySpan<byte> data, ulong off)
    {
        ulong vc = off >> _cb;
        int inC = (int)(off & _cmask);
        int slot = GetL2ForWrite(vc >> _l2Bits);
        var t = _l2.Span(slot);
        int ei = (int)(vc & (ulong)(_l2Entries - 1)) * _entrySize;
        ulong e = BinaryPrimitives.ReadUInt64BigEndian(t[ei..]);
        ulong bm = _ext ? BinaryPrimitives.ReadUInt64BigEndian(t[(ei + 8)..]) : 0;
        ulong host = e & Qcow2Const.OffsetMask;
        bool compressed = (e & Qcow2Const.CompressedFlag) != 0;
        if (!compressed && host != 0 && (e & Qcow2Const.CopiedFlag) != 0)
        {
            CheckDataOffset(host, vc);
            CheckNotMetadata(host, vc);
            if (host + (ulong)_cs > _fileEnd)
                MarkCorruptAndThrow($"L2 entry for cluster {vc} points past the end of the file (0x{host:x})", host);
            bool inPlace = _ext ? SubclustersAllocated(bm, inC, data.Length) : !(_v3 && (e & Qcow2Const.ZeroFlag) != 0);
            if (inPlace)
            {
                PWrite(data, host + (ulong)inC);
                return;
            }
            // Zero-flagged preallocated cluster or partly allocated subclusters: materialise the whole
            // cluster in place; the host cluster is ours (COPIED), nothing else references it.
            FillCow(vc, inC, data.Length);
            data.CopyTo(_cow.AsSpan(inC));
            PWrite(_cow, host);
            SetEntry(slot, ei, host | Qcow2Const.CopiedFlag, _ext ? 0xffffffffUL : 0);
            return;
        }
        // Copy on write into a fresh cluster: the backing data, zeros, or the old shared/compressed cluster.
        ReadOnlySpan<byte> payload = data;
        ulong writeAt = (ulong)inC;
        ulong nh = AllocateCluster();
        if (data.Length < _cs)
        {
            bool zeroCow = host == 0 && !compressed
                && (Backing is null || !_ext && _v3 && (e & Qcow2Const.ZeroFlag) != 0);
            // A cluster past everything written so far is a hole in the file and reads as zeros already;
            // then only the data needs writing (QEMU gets the same effect with write-zeroes).
            if (!(zeroCow && nh >= _physEnd))
            {
                FillCow(vc, inC, data.Length);
                data.CopyTo(_cow.AsSpan(inC));
                payload = _cow;
                writeAt = 0;
            }
        }
        PWrite(payload, nh + writeAt);
        // Allocation may have evicted/reloaded L2 slots; re-find ours (it is never evicted while dirty-free? reload).
        slot = GetL2ForWrite(vc >> _l2Bits);
        SetEntry(slot, ei, nh | Qcow2Const.CopiedFlag, _ext ? 0xffffffffUL : 0);
        if (compressed) DeferFreeCompressed(e);
        else if (host != 0) DeferFree(host);
    }

    private bool SubclustersAllocated(ulong bm, int inC, int len)
    {
        // qcow2.txt "Extended L2 Entries": a cluster has 32 subclusters; the write may touch several.
        int sc = _cs / 32;
        int first = inC / sc, last = (inC + len - 1) / sc;
        ulong mask = (last == 31 ? 0xffffffffUL : (1UL << (last + 1)) - 1) & ~((1UL << first) - 1);
        return (bm & mask) == mask;
    }

    private void SetEntry(int slot, int ei, ulong e, ulong bm)
    {
        var t = _l2.Span(slot);
        BinaryPrimitives.WriteUInt64BigEndian(t[ei..], e);
        if (_ext) BinaryPrimitives.WriteUInt64BigEndian(t[(ei + 8)..], bm);
        _l2.MarkDirty(slot);
    }

    /// <summary>Fills _cow with the cluster's current content outside [inC, inC+len).</summary>
    private void FillCow(ulong vc, int inC, int len)
    {
        ulong start = vc << _cb;
        int valid = (int)Math.Min((ulong)_cs, Size - start);
        var head = _cow.AsSpan(0, Math.Min(inC, valid));
        if (head.Length > 0) ReadCore(head, start);
        int tailStart = inC + len;
        if (tailStart < valid) ReadCore(_cow.AsSpan(tailStart, valid - tailStart), start + (ulong)tailStart);
        if (valid < _cs) _cow.AsSpan(Math.Max(valid, tailStart)).Clear();
    }

    private void CheckNotMetadata(ulong host, ulong vc)
    {
        // QEMU's "overlap check" for the cheap, always-known structures: header, L1, refcount table.
        ulong end = host + (ulong)_cs;
        bool bad = host < (ulong)_cs
            || Overlaps(host, end, _l1Offset, (ulong)_l1.Length * 8)
            || Overlaps(host, end, _rcTableOffset, (ulong)_rcTable.Length * 8);
        if (bad) MarkCorruptAndThrow($"L2 entry for cluster {vc} points into metadata at 0x{host:x}", host);
    }

    private static bool Overlaps(ulong a, ulong aEnd, ulong b, ulong len) => len != 0 && a < b + len && b < aEnd;

    private void MarkCorruptAndThrow(string message, ulong offset)
    {
        if (_v3 && !ReadOnly)
        {
            Header.Incompatible |= Qcow2Const.IncompatCorrupt;
            try { WriteHeaderU64(72, Header.Incompatible); Sync(); } catch (ImageException) { }
        }
        ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, message + "; image marked corrupt", (long)Math.Min(offset, long.MaxValue));
    }

    /// <summary>Returns a cache slot holding a writable (COPIED) L2 table for L1 index <paramref name="l1i"/>.</summary>
    private int GetL2ForWrite(ulong l1i)
    {
        ulong l1e = _l1[l1i];
        ulong l2 = ValidL2Offset(l1e, l1i);
        if (l2 != 0 && (l1e & Qcow2Const.CopiedFlag) != 0)
        {
            if (l2 < (ulong)_cs) MarkCorruptAndThrow($"L1 entry {l1i} points into the header", l2);
            return LoadL2(l2);
        }
        // New L2 table (or copy of a shared one). Read the old content before allocating.
        ulong nl2 = AllocateCluster();
        int slot = _l2.Victim();
        if (_l2.IsDirty(slot)) FlushMetadata();
        var t = _l2.Span(slot);
        if (l2 != 0)
        {
            PReadMeta(t, l2, "L2 table");
            DeferFree(l2);
        }
        else t.Clear();
        _l2.Assign(slot, nl2);
        _l2.MarkDirty(slot);
        _l1[l1i] = nl2 | Qcow2Const.CopiedFlag;
        _l1DirtyMin = Math.Min(_l1DirtyMin, (int)l1i);
        _l1DirtyMax = Math.Max(_l1DirtyMax, (int)l1i);
        return slot;
    }

    private void ZeroCluster(ulong vc)
    {
        ulong l1i = vc >> _l2Bits;
        bool needRecord = Backing is not null;
        if (!needRecord && (_l1[l1i] & Qcow2Const.OffsetMask) == 0) return; // unallocated already reads zero
        if (!_v3 && Backing is not null)
        {
            // v2 has no zero flag: zeros must be written as data.
            int n = (int)Math.Min((ulong)_cs, Size - (vc << _cb));
            WriteChunk(ZeroBuffer.Span[..n], vc << _cb);
            return;
        }
        int slot = GetL2ForWrite(l1i);
        int ei = (int)(vc & (ulong)(_l2Entries - 1)) * _entrySize;
        var t = _l2.Span(slot);
        ulong e = BinaryPrimitives.ReadUInt64BigEndian(t[ei..]);
        ulong host = e & Qcow2Const.OffsetMask;
        if ((e & Qcow2Const.CompressedFlag) != 0) DeferFreeCompressed(e);
        else if (host != 0) DeferFree(host);
        if (_ext) SetEntry(slot, ei, 0, 0xffffffff00000000UL);
        else SetEntry(slot, ei, _v3 ? Qcow2Const.ZeroFlag : 0, 0);
    }

    // ---------------------------------------------------------------- refcounts

    private ulong RefcountMask => _rcOrder == 6 ? ulong.MaxValue : (1UL << (1 << _rcOrder)) - 1;

    internal static ulong GetRefcountIn(ReadOnlySpan<byte> blk, ulong i, int order)
    {
        switch (order)
        {
            case < 3:
                {
                    int bits = 1 << order;
                    int perByte = 8 >> order;
                    int shift = (int)(i % (ulong)perByte) * bits;
                    return (ulong)(blk[(int)(i / (ulong)perByte)] >> shift) & ((1UL << bits) - 1);
                }
            case 3: return blk[(int)i];
            case 4: return BinaryPrimitives.ReadUInt16BigEndian(blk[(int)(i * 2)..]);
            case 5: return BinaryPrimitives.ReadUInt32BigEndian(blk[(int)(i * 4)..]);
            default: return BinaryPrimitives.ReadUInt64BigEndian(blk[(int)(i * 8)..]);
        }
    }

    internal static void SetRefcountIn(Span<byte> blk, ulong i, int order, ulong v)
    {
        switch (order)
        {
            case < 3:
                {
                    int bits = 1 << order;
                    int perByte = 8 >> order;
                    int shift = (int)(i % (ulong)perByte) * bits;
                    int idx = (int)(i / (ulong)perByte);
                    int mask = ((1 << bits) - 1) << shift;
                    blk[idx] = (byte)((blk[idx] & ~mask) | (((int)v << shift) & mask));
                    break;
                }
            case 3: blk[(int)i] = (byte)v; break;
            case 4: BinaryPrimitives.WriteUInt16BigEndian(blk[(int)(i * 2)..], (ushort)v); break;
            case 5: BinaryPrimitives.WriteUInt32BigEndian(blk[(int)(i * 4)..], (uint)v); break;
            default: BinaryPrimitives.WriteUInt64BigEndian(blk[(int)(i * 8)..], v); break;
        }
    }

    private int LoadRefblock(ulong off, ulong rti)
    {
        int slot = _rb.Find(off);
        if (slot >= 0) return slot;
        if ((off & _cmask) != 0 || off < (ulong)_cs)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"refcount table entry {rti} has invalid offset 0x{off:x}", (long)(_rcTableOffset + rti * 8));
        slot = _rb.Victim();
        if (_rb.IsDirty(slot)) WriteRefblock(slot);
        PReadMeta(_rb.Span(slot), off, "refcount block");
        _rb.Assign(slot, off);
        return slot;
    }

    private void WriteRefblock(int slot)
    {
        PWrite(_rb.Span(slot), _rb.OffsetOf(slot));
        _rb.MarkClean(slot);
    }

    internal ulong GetRefcount(ulong ci)
    {
        ulong rti = ci >> _rbBits;
        if (rti >= (ulong)_rcTable.Length) return 0;
        ulong blk = _rcTable[rti] & Qcow2Const.OffsetMask;
        if (blk == 0) return 0;
        int slot = LoadRefblock(blk, rti);
        return GetRefcountIn(_rb.Span(slot), ci & ((1UL << _rbBits) - 1), _rcOrder);
    }

    /// <summary>True when a refcount block at <paramref name="off"/> can be read: aligned, past the header,
    /// inside the file (qemu-img check: "refcount block is not cluster aligned" / "is outside image").</summary>
    internal bool RefblockUsable(ulong off) => (off & _cmask) == 0 && off >= (ulong)_cs && off + (ulong)_cs <= _fileEnd;

    /// <summary>Refcount of <paramref name="ci"/>, or false when its refcount block cannot be read.</summary>
    internal bool TryGetRefcount(ulong ci, out ulong rc)
    {
        rc = 0;
        ulong rti = ci >> _rbBits;
        if (rti >= (ulong)_rcTable.Length) return true;
        ulong blk = _rcTable[rti] & Qcow2Const.OffsetMask;
        if (blk == 0) return true;
        if (!RefblockUsable(blk)) return false;
        rc = GetRefcountIn(_rb.Span(LoadRefblock(blk, rti)), ci & ((1UL << _rbBits) - 1), _rcOrder);
        return true;
    }

    /// <summary>Repair: forgets an unusable refcount block, so its range gets a fresh one when next written.</summary>
    internal void DropRefblock(ulong rti)
    {
        _rcTable[rti] = 0;
        _rcDirtyMin = Math.Min(_rcDirtyMin, (int)rti);
        _rcDirtyMax = Math.Max(_rcDirtyMax, (int)rti);
    }

    internal void SetRefcount(ulong ci, ulong v)
    {
        if (v > RefcountMask)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, _path, $"refcount of cluster {ci} would exceed {1 << _rcOrder}-bit refcounts", (long)(ci << _cb));
        ulong rti = ci >> _rbBits;
        if (rti >= (ulong)_rcTable.Length) GrowRefTable(rti + 1);
        ulong blk = _rcTable[rti] & Qcow2Const.OffsetMask;
        if (blk == 0) blk = CreateRefblock(rti);
        int slot = LoadRefblock(blk, rti);
        SetRefcountIn(_rb.Span(slot), ci & ((1UL << _rbBits) - 1), _rcOrder, v);
        _rb.MarkDirty(slot);
        if (v == 0 && ci < _freeHint) _freeHint = ci;
    }

    private bool Reserved(ulong ci) => ci >= _reservedStart && ci < _reservedEnd || _repairInUse is { } r && ci < r.Clusters && r.Get(ci) != 0;

    /// <summary>
    /// Creates the refcount block for range <paramref name="rti"/> inside that range, so it describes itself.
    /// A range without a block has no allocated cluster, so its first non-reserved cluster is free.
    /// </summary>
    private ulong CreateRefblock(ulong rti)
    {
        ulong first = rti << _rbBits;
        ulong count = 1UL << _rbBits;
        ulong place = first;
        while (place < first + count && (Reserved(place) || place == 0)) place++;
        bool selfDescribing = place < first + count;
        if (!selfDescribing)
        {
            // The whole range is a reserved run (a long table being placed): put the block right after
            // the run, in a later range, and extend the run over it so nothing else claims it.
            if (_reservedEnd >= first + count)
            {
                place = _reservedEnd;
                while (GetRefcount(place) != 0 || Reserved(place)) place++;
                _reservedEnd = place + 1;
            }
            else
            {
                // Repair after an unreadable block was dropped: every cluster of the range is referenced.
                // The block goes to the first free cluster elsewhere, counted in that range's block.
                place = Math.Max(_freeHint, 1);
                while (place >= first && place < first + count || GetRefcount(place) != 0 || Reserved(place)) place++;
            }
        }
        // During repair the new block is metadata the computed references did not know: count it, so
        // nothing else is placed there and the repair does not "fix" its refcount back to 0.
        if (_repairInUse is { } inUse && place < inUse.Clusters) inUse.Increment(place);
        ulong off = place << _cb;
        int slot = _rb.Victim();
        if (_rb.IsDirty(slot)) WriteRefblock(slot);
        var s = _rb.Span(slot);
        s.Clear();
        _rb.Assign(slot, off);
        if (selfDescribing) SetRefcountIn(s, place - first, _rcOrder, 1);
        _rb.MarkDirty(slot);
        // The block itself must reach disk before the table entry that names it.
        WriteRefblock(slot);
        _rcTable[rti] = off;
        _rcDirtyMin = Math.Min(_rcDirtyMin, (int)rti);
        _rcDirtyMax = Math.Max(_rcDirtyMax, (int)rti);
        if (off + (ulong)_cs > _fileEnd) _fileEnd = off + (ulong)_cs;
        if (!selfDescribing) SetRefcount(place, 1); // counted in its own range's block (created if needed)
        return off;
    }

    /// <summary>Allocates one cluster (refcount 1) and returns its host offset.</summary>
    internal ulong AllocateCluster()
    {
        ulong ci = _freeHint == 0 ? 1 : _freeHint;
        while (true)
        {
            ulong rti = ci >> _rbBits;
            if (rti >= (ulong)_rcTable.Length) GrowRefTable(rti + 1);
            if ((_rcTable[rti] & Qcow2Const.OffsetMask) == 0) CreateRefblock(rti);
            if (!Reserved(ci) && GetRefcount(ci) == 0) break;
            ci++;
            if (ci > (Qcow2Const.MaxVirtualSize >> _cb))
                ThrowHelper.Throw(ImageErrorKind.Io, _path, "image file would grow beyond the supported size", -1);
        }
        SetRefcount(ci, 1);
        _freeHint = ci + 1;
        ulong off = ci << _cb;
        if (off + (ulong)_cs > _fileEnd) _fileEnd = off + (ulong)_cs;
        return off;
    }

    /// <summary>Allocates <paramref name="n"/> contiguous clusters at the end of the file.</summary>
    internal ulong AllocateContiguousAtEnd(ulong n)
    {
        // Grow the refcount table first, so no growth happens while our run is reserved.
        while (((ulong)_rcTable.Length << _rbBits) <= (_fileEnd >> _cb) + n + 2)
            GrowRefTable(((_fileEnd >> _cb) + n + 2 >> _rbBits) + 1);
        ulong start = _fileEnd >> _cb;
        _fileEnd = (start + n) << _cb;
        _reservedStart = start;
        _reservedEnd = start + n;
        try
        {
            for (ulong i = 0; i < n; i++)
            {
                ulong ci = start + i;
                ulong rti = ci >> _rbBits;
                if ((_rcTable[rti] & Qcow2Const.OffsetMask) == 0) CreateRefblock(rti); // placed outside our run
                int slot = LoadRefblock(_rcTable[rti] & Qcow2Const.OffsetMask, rti);
                SetRefcountIn(_rb.Span(slot), ci & ((1UL << _rbBits) - 1), _rcOrder, 1);
                _rb.MarkDirty(slot);
            }
        }
        finally { _reservedStart = _reservedEnd = 0; }
        return start << _cb;
    }

    private void GrowRefTable(ulong minEntries)
    {
        int perCluster = _cs / 8;
        ulong newLen = Math.Max(minEntries, (ulong)_rcTable.Length * 2);
        ulong t = (_fileEnd >> _cb) + 1;
        ulong k;
        while (true)
        {
            newLen = (newLen + (ulong)perCluster - 1) / (ulong)perCluster * (ulong)perCluster;
            k = newLen / (ulong)perCluster;
            // The new table must also cover itself and the refcount blocks created for it.
            if ((newLen << _rbBits) > t + k + 4) break;
            newLen += (ulong)perCluster;
        }
        if (newLen * 8 > Qcow2Const.MaxRefTableBytes)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, _path, "refcount table would exceed 8 MiB", -1);
        var nt = new ulong[newLen];
        Array.Copy(_rcTable, nt, _rcTable.Length);
        ulong oldOff = _rcTableOffset;
        ulong oldClusters = ((ulong)_rcTable.Length * 8 + _cmask) >> _cb;
        FlushRefcounts(); // old table on disk consistent before we switch
        _rcTable = nt;
        _reservedStart = t;
        _reservedEnd = t + k;
        if (((t + k) << _cb) > _fileEnd) _fileEnd = (t + k) << _cb;
        for (ulong i = 0; i < k; i++)
        {
            ulong ci = t + i;
            ulong rti = ci >> _rbBits;
            if ((nt[rti] & Qcow2Const.OffsetMask) == 0) CreateRefblock(rti);
            int slot = LoadRefblock(nt[rti] & Qcow2Const.OffsetMask, rti);
            SetRefcountIn(_rb.Span(slot), ci & ((1UL << _rbBits) - 1), _rcOrder, 1);
            _rb.MarkDirty(slot);
        }
        _reservedStart = _reservedEnd = 0;
        for (int i = 0; i < _rb.Slots; i++) if (_rb.IsDirty(i)) WriteRefblock(i);
        WriteU64Table(nt, 0, nt.Length, t << _cb);
        Sync();
        _rcTableOffset = t << _cb;
        _rcDirtyMin = int.MaxValue; _rcDirtyMax = -1;
        Header.RefcountTableOffset = _rcTableOffset;
        Header.RefcountTableClusters = (uint)k;
        Span<byte> hb = stackalloc byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(hb, _rcTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(hb[8..], (uint)k);
        PWrite(hb, 48);
        Sync();
        for (ulong i = 0; i < oldClusters; i++) SetRefcount((oldOff >> _cb) + i, 0);
    }

    private void WriteU64Table(ulong[] table, int from, int to, ulong tableOffset)
    {
        // from/to in entries; written in cluster-sized pieces through the scratch buffer
        int per = _scratch.Length / 8;
        for (int i = from; i < to; i += per)
        {
            int n = Math.Min(per, to - i);
            var s = _scratch.AsSpan(0, n * 8);
            for (int j = 0; j < n; j++) BinaryPrimitives.WriteUInt64BigEndian(s[(j * 8)..], table[i + j]);
            PWrite(s, tableOffset + (ulong)i * 8);
        }
    }

    private void DeferFree(ulong host) => _pendingFree.Add(host >> _cb);

    private void DeferFreeCompressed(ulong e)
    {
        DecodeCompressed(e, out ulong off, out int len);
        ulong first = off >> _cb;
        ulong last = (off + (ulong)len - 1) >> _cb;
        for (ulong c = first; c <= last; c++) _pendingFree.Add(c);
    }

    private void FlushRefcounts()
    {
        for (int i = 0; i < _rb.Slots; i++) if (_rb.IsDirty(i)) WriteRefblock(i);
        if (_rcDirtyMax >= 0)
        {
            WriteU64Table(_rcTable, _rcDirtyMin, _rcDirtyMax + 1, _rcTableOffset);
            _rcDirtyMin = int.MaxValue; _rcDirtyMax = -1;
        }
    }

    /// <summary>
    /// Writes dirty metadata in the crash-safe order: refcounts → fsync → L2 tables → fsync → L1 → frees.
    /// </summary>
    internal void FlushMetadata()
    {
        if (ReadOnly) return;
        bool refs = _l2.DirtyCount > 0 || _l1DirtyMax >= 0;
        FlushRefcounts();
        if (refs)
        {
            Sync(); // data clusters and their refcounts are durable before anything points to them
            if (_l2.DirtyCount > 0)
            {
                for (int i = 0; i < _l2.Slots; i++)
                {
                    if (!_l2.IsDirty(i)) continue;
                    PWrite(_l2.Span(i), _l2.OffsetOf(i));
                    _l2.MarkClean(i);
                }
            }
            if (_l1DirtyMax >= 0)
            {
                Sync(); // new L2 tables are on disk before L1 names them
                WriteU64Table(_l1, _l1DirtyMin, _l1DirtyMax + 1, _l1Offset);
                _l1DirtyMin = int.MaxValue; _l1DirtyMax = -1;
            }
        }
        if (_pendingFree.Count > 0 && Volatile.Read(ref _inflight) == 0)
        {
            Sync(); // references are gone from disk before the refcounts drop
            foreach (ulong c in _pendingFree)
            {
                ulong rc = GetRefcount(c);
                if (rc > 0) SetRefcount(c, rc - 1);
            }
            _pendingFree.Clear();
            _decompKey = ulong.MaxValue;
            FlushRefcounts();
        }
    }

    // ---------------------------------------------------------------- resize

    /// <summary>Grows the virtual disk (shrinking is refused, as qemu-img without --shrink).</summary>
    public void Resize(ulong newSize)
    {
        if (ReadOnly) ThrowHelper.Throw(ImageErrorKind.ReadOnly, _path, "image is opened read-only");
        if (newSize > Qcow2Const.MaxVirtualSize) ThrowHelper.Throw(ImageErrorKind.InvalidArgument, _path, "size too large");
        lock (_lock)
        {
            if (newSize < Size)
                ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, _path, "shrinking a qcow2 image is not supported");
            ulong bytesPerL1 = 1UL << (_cb + _l2Bits);
            ulong needL1 = (newSize + bytesPerL1 - 1) / bytesPerL1;
            if (needL1 > (ulong)_l1.Length)
            {
                if (needL1 * 8 > Qcow2Const.MaxL1Bytes) ThrowHelper.Throw(ImageErrorKind.InvalidArgument, _path, "size too large for the L1 table");
                FlushMetadata();
                var nl1 = new ulong[needL1];
                Array.Copy(_l1, nl1, _l1.Length);
                ulong clusters = (needL1 * 8 + _cmask) >> _cb;
                ulong off = AllocateContiguousAtEnd(clusters);
                FlushRefcounts();
                WriteU64Table(nl1, 0, nl1.Length, off);
                if (((ulong)nl1.Length * 8 & _cmask) != 0)
                    PWrite(ZeroBuffer.Span[..(int)((clusters << _cb) - (ulong)nl1.Length * 8)], off + (ulong)nl1.Length * 8);
                Sync();
                ulong oldOff = _l1Offset;
                ulong oldClusters = ((ulong)_l1.Length * 8 + _cmask) >> _cb;
                Span<byte> hb = stackalloc byte[12];
                BinaryPrimitives.WriteUInt32BigEndian(hb, (uint)needL1);
                BinaryPrimitives.WriteUInt64BigEndian(hb[4..], off);
                PWrite(hb, 36);
                Sync();
                _l1 = nl1;
                _l1Offset = off;
                Header.L1Size = (uint)needL1;
                Header.L1TableOffset = off;
                if (oldOff != 0) for (ulong i = 0; i < oldClusters; i++) _pendingFree.Add((oldOff >> _cb) + i);
            }
            WriteHeaderU64(24, newSize);
            Header.Size = newSize;
            Size = newSize;
            FlushMetadata();
            Sync();
        }
    }

    // ---------------------------------------------------------------- compressed writes and unmapping

    private ulong _compCursor; // next free byte in the cluster holding the last compressed data, or 0

    /// <summary>Writes one whole virtual cluster compressed (convert -c). Falls back to a normal write when
    /// compression does not help. qcow2.txt "Compressed Clusters Descriptor".</summary>
    internal void WriteCompressedCluster(ulong vc, ReadOnlySpan<byte> cluster)
    {
        lock (_lock)
        {
            var dst = _compBuf.AsSpan(0, _cs);
            int len;
            if (Header.CompressionType == 1)
            {
                using var c = new ZstdSharp.Compressor(3);
                len = c.TryWrap(cluster, dst, out int w) ? w : -1;
            }
            else len = Zlib.CompressRaw12(cluster, dst);
            if (len <= 0 || len >= _cs - 512)
            {
                WriteChunkWhole(cluster, vc);
                return;
            }
            ulong off;
            ulong cursorCluster = _compCursor >> _cb;
            if (_compCursor != 0 && (_compCursor & _cmask) != 0 && ((_compCursor + (ulong)len - 1) >> _cb) == cursorCluster)
            {
                off = _compCursor; // shares the cluster: one more reference
                SetRefcount(cursorCluster, GetRefcount(cursorCluster) + 1);
            }
            else
            {
                off = AllocateCluster();
            }
            PWrite(dst[..len], off);
            _compCursor = off + (ulong)len;
            int x = 62 - (_cb - 8);
            ulong extra = ((off + (ulong)len - 1) >> 9) - (off >> 9);
            ulong e = Qcow2Const.CompressedFlag | (extra << x) | off;
            int slot = GetL2ForWrite(vc >> _l2Bits);
            int ei = (int)(vc & (ulong)(_l2Entries - 1)) * _entrySize;
            var t = _l2.Span(slot);
            ulong old = BinaryPrimitives.ReadUInt64BigEndian(t[ei..]);
            SetEntry(slot, ei, e, 0);
            if ((old & Qcow2Const.CompressedFlag) != 0) DeferFreeCompressed(old);
            else if ((old & Qcow2Const.OffsetMask) != 0) DeferFree(old & Qcow2Const.OffsetMask);
        }
    }

    private void WriteChunkWhole(ReadOnlySpan<byte> cluster, ulong vc)
    {
        int n = (int)Math.Min((ulong)_cs, Size - (vc << _cb));
        WriteChunk(cluster[..n], vc << _cb);
    }

    /// <summary>Makes a virtual cluster unallocated again, so reads fall through to the backing file.</summary>
    internal void UnmapCluster(ulong vc)
    {
        lock (_lock)
        {
            ulong l1i = vc >> _l2Bits;
            if ((_l1[l1i] & Qcow2Const.OffsetMask) == 0) return;
            int slot = GetL2ForWrite(l1i);
            int ei = (int)(vc & (ulong)(_l2Entries - 1)) * _entrySize;
            ulong e = BinaryPrimitives.ReadUInt64BigEndian(_l2.Span(slot)[ei..]);
            ulong bm = _ext ? BinaryPrimitives.ReadUInt64BigEndian(_l2.Span(slot)[(ei + 8)..]) : 0;
            if (e == 0 && bm == 0) return;
            if ((e & Qcow2Const.CompressedFlag) != 0) DeferFreeCompressed(e);
            else if ((e & Qcow2Const.OffsetMask) != 0) DeferFree(e & Qcow2Const.OffsetMask);
            SetEntry(slot, ei, 0, 0);
        }
    }

    // ---------------------------------------------------------------- introspection for check/map/info

    internal ulong[] L1 => _l1;
    internal ulong L1Offset => _l1Offset;
    internal ulong[] RefcountTable => _rcTable;
    internal ulong RefcountTableOffset => _rcTableOffset;
    internal int ClusterBits => _cb;
    internal int L2BitsValue => _l2Bits;
    internal int L2EntrySize => _entrySize;
    internal ulong FileEnd => _fileEnd;
    internal long FileLength => RandomAccess.GetLength(_file);
    internal object SyncRoot => _lock;
    internal RefcountMap? RepairInUse { get => _repairInUse; set => _repairInUse = value; }

    internal void ReadHost(Span<byte> dst, ulong off) => PRead(dst, off);

    internal void ReadL2Table(ulong off, Span<byte> dst)
    {
        int slot = _l2.Find(off);
        if (slot >= 0) { _l2.Span(slot).CopyTo(dst); return; }
        PReadMeta(dst, off, "L2 table");
    }

    internal void ReadRefblockRaw(ulong off, Span<byte> dst)
    {
        int slot = _rb.Find(off);
        if (slot >= 0) { _rb.Span(slot).CopyTo(dst); return; }
        PReadMeta(dst, off, "refcount block");
    }

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
        int l1Shift = _cb + _l2Bits;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            ulong l1i = offset >> l1Shift;
            if (l1i >= (ulong)_l1.Length || (_l1[l1i] & Qcow2Const.OffsetMask) == 0)
            {
                // qcow2.txt "Cluster mapping": an L1 entry of 0 means its whole L2 range is unallocated.
                ulong i = l1i + 1;
                ulong pos = i << l1Shift;
                while (pos < end && i < (ulong)_l1.Length && (_l1[i] & Qcow2Const.OffsetMask) == 0)
                {
                    i++;
                    pos += 1UL << l1Shift;
                }
                if (i >= (ulong)_l1.Length) pos = end; // no L1 entries beyond the table: all unallocated
                return new BlockExtent(BlockState.Unallocated, Math.Min(pos, end) - offset);
            }
            ulong l2Off = ValidL2Offset(_l1[l1i], l1i);
            ReadOnlySpan<byte> table = _l2.Span(LoadL2(l2Off));
            ulong tableEnd = Math.Min(end, (l1i + 1) << l1Shift);
            return _ext ? ExtendedStatus(table, l2Off, offset, tableEnd) : StandardStatus(table, l2Off, offset, tableEnd);
        }
    }

    private BlockExtent StandardStatus(ReadOnlySpan<byte> table, ulong l2Off, ulong offset, ulong end)
    {
        int idx = (int)((offset >> _cb) & (ulong)(_l2Entries - 1));
        ulong inC = offset & _cmask;
        var (state, host) = StandardMapping(table, idx, l2Off);
        if (host != BlockExtent.NoOffset) host += inC;
        ulong pos = ((offset >> _cb) + 1) << _cb;
        ulong nextHost = host == BlockExtent.NoOffset ? host : host - inC + (ulong)_cs;
        for (idx++; pos < end && idx < _l2Entries; idx++)
        {
            var (s, h) = StandardMapping(table, idx, l2Off);
            if (s != state || h != nextHost) break;
            pos += (ulong)_cs;
            if (h != BlockExtent.NoOffset) nextHost += (ulong)_cs;
        }
        return new BlockExtent(state, Math.Min(pos, end) - offset, host);
    }

    /// <summary>State and host cluster (or NoOffset) of standard L2 entry <paramref name="idx"/>.</summary>
    private (BlockState, ulong) StandardMapping(ReadOnlySpan<byte> table, int idx, ulong l2Off)
    {
        var e = new L2Entry(BinaryPrimitives.ReadUInt64BigEndian(table[(idx * _entrySize)..]));
        if (e.IsCompressed) return (BlockState.Data, BlockExtent.NoOffset);
        ulong h = e.HostOffset;
        if (e.ZeroFlag && !_v3)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"Zero cluster entry found in pre-v3 image (L2 offset: 0x{l2Off:x}, L2 index: 0x{idx:x})", (long)(l2Off + (ulong)idx * 8));
        if (h != 0) CheckHostCluster(h, l2Off, idx);
        if (e.ZeroFlag) return (BlockState.Zero, h == 0 ? BlockExtent.NoOffset : h);
        return h == 0 ? (BlockState.Unallocated, BlockExtent.NoOffset) : (BlockState.Data, h);
    }

    private void CheckHostCluster(ulong h, ulong l2Off, int idx)
    {
        if ((h & _cmask) != 0 || h < (ulong)_cs)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"Cluster allocation offset 0x{h:x} unaligned (L2 offset: 0x{l2Off:x}, L2 index: 0x{idx:x})", (long)(l2Off + (ulong)idx * (ulong)_entrySize));
    }

    private BlockExtent ExtendedStatus(ReadOnlySpan<byte> table, ulong l2Off, ulong offset, ulong end)
    {
        // qcow2.txt "Extended L2 Entries": 32 subclusters per cluster; bitmap bit x = allocated, 32+x = zero.
        int scBits = _cb - 5;
        ulong scSize = 1UL << scBits;
        int idx = (int)((offset >> _cb) & (ulong)(_l2Entries - 1));
        int sc = (int)((offset & _cmask) >> scBits);
        var (state, host) = SubclusterMapping(table, idx, sc, l2Off);
        ulong inSc = offset & (scSize - 1);
        ulong nextHost = host == BlockExtent.NoOffset ? host : host + scSize;
        if (host != BlockExtent.NoOffset) host += inSc;
        ulong pos = offset - inSc + scSize;
        while (pos < end)
        {
            if (++sc == 32)
            {
                sc = 0;
                if (++idx == _l2Entries) break;
            }
            var (s, h) = SubclusterMapping(table, idx, sc, l2Off);
            if (s != state || h != nextHost) break;
            pos += scSize;
            if (h != BlockExtent.NoOffset) nextHost += scSize;
        }
        return new BlockExtent(state, Math.Min(pos, end) - offset, host);
    }

    private (BlockState, ulong) SubclusterMapping(ReadOnlySpan<byte> table, int idx, int sc, ulong l2Off)
    {
        var e = new L2Entry(BinaryPrimitives.ReadUInt64BigEndian(table[(idx * 16)..]));
        if (e.IsCompressed) return (BlockState.Data, BlockExtent.NoOffset);
        ulong bm = BinaryPrimitives.ReadUInt64BigEndian(table[(idx * 16 + 8)..]);
        ulong h = e.HostOffset;
        bool alloc = ((bm >> sc) & 1) != 0, zero = ((bm >> (32 + sc)) & 1) != 0;
        if (alloc && (zero || h == 0))
            ThrowHelper.Throw(ImageErrorKind.Corrupt, _path, $"Invalid cluster entry found (L2 offset: 0x{l2Off:x}, L2 index: 0x{idx:x})", (long)(l2Off + (ulong)idx * 16));
        if (h == 0) return (zero ? BlockState.Zero : BlockState.Unallocated, BlockExtent.NoOffset);
        CheckHostCluster(h, l2Off, idx);
        ulong sh = h + ((ulong)sc << (_cb - 5));
        return (alloc ? BlockState.Data : zero ? BlockState.Zero : BlockState.Unallocated, sh);
    }

    internal void SetHeaderDirtyBits(ulong incompatible)
    {
        Header.Incompatible = incompatible;
        WriteHeaderU64(72, incompatible);
        Sync();
    }

    /// <summary>Rewrites the backing file name and format in the header cluster (rebase).</summary>
    internal void SetBacking(string? name, string? format)
    {
        lock (_lock)
        {
            FlushMetadata();
            var buf = new byte[_cs];
            Header.BackingFile = name;
            Header.BackingFormat = name is null ? null : format;
            Header.Write(buf, writeFeatureTable: Header.Version >= 3);
            // Header.Write sets HeaderLength=112 for v3; extensions are rewritten from the parsed header.
            PWrite(buf.AsSpan(0, _cs), 0);
            Sync();
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            try
            {
                if (!ReadOnly) { FlushMetadata(); Sync(); }
            }
            finally
            {
                _disposed = true;
                _file.Dispose();
                _zstd?.Dispose();
                Backing?.Dispose();
            }
        }
    }
}
