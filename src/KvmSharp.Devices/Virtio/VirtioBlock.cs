using System.Buffers.Binary;
using System.Text;
using KvmSharp.Images;
using KvmSharp.Interop;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>Feature bits and constants of the virtio block device (virtio 1.2 §5.2).</summary>
public static class VirtioBlockFeatures
{
    public const ulong SIZE_MAX = 1UL << 1;
    public const ulong SEG_MAX = 1UL << 2;
    public const ulong GEOMETRY = 1UL << 4;
    public const ulong RO = 1UL << 5;
    public const ulong BLK_SIZE = 1UL << 6;
    public const ulong FLUSH = 1UL << 9;
    public const ulong TOPOLOGY = 1UL << 10;
    public const ulong CONFIG_WCE = 1UL << 11;
    public const ulong MQ = 1UL << 12;
    public const ulong DISCARD = 1UL << 13;
    public const ulong WRITE_ZEROES = 1UL << 14;
}

/// <summary>
/// virtio block device (virtio 1.2 §5.2) over a <see cref="IBlockDevice"/>: one request queue
/// (or several with VIRTIO_BLK_F_MQ), IN/OUT/FLUSH/GET_ID/DISCARD/WRITE_ZEROES. Each request goes
/// parse → execute → complete: <see cref="BlockRequest.Parse"/> checks framing, type and sector
/// range before the back end sees anything; a bad request gets VIRTIO_BLK_S_IOERR or _UNSUPP in
/// its status byte, never an exception.
/// </summary>
/// <remarks>
/// <para><b>Threads.</b> <see cref="QueueNotify"/> (the VMM's I/O thread) only wakes the disk's
/// worker thread, which pops, executes and completes the requests (used entry, then the interrupt
/// once per batch), so a guest fsync storm or a qcow2 copy-on-write never stalls the network or
/// the console. <see cref="ProcessQueue"/> is that worker's body (tests call it directly).</para>
/// <para><b>Reset.</b> The worker holds the device lock for one request at a time (pop, I/O,
/// status, used entry); <see cref="Reset"/> takes the same lock, so it waits for the request in
/// flight, at most one, and once it returns the worker no longer touches guest memory.</para>
/// <para>Payload moves straight between the back end and guest memory when a buffer lies in one
/// RAM region, otherwise through one preallocated bounce buffer: nothing is allocated per
/// request. Framing does not depend on descriptor boundaries (§2.6.4): the header is the first
/// 16 readable bytes, the status the last writable byte.</para>
/// <para>Cache mode: with VIRTIO_BLK_F_FLUSH negotiated the device is write-back and the driver
/// sends FLUSH; without it every OUT/DISCARD/WRITE_ZEROES is followed by a back-end flush
/// (§5.2.5.1, write-through).</para>
/// </remarks>
public sealed class VirtioBlock : IVirtioDevice, IDisposable
{
    /// <summary>Sector unit of request headers and of the capacity field (§5.2.6: always 512).</summary>
    public const int SectorSize = BlockRequest.SectorSize;

    /// <summary>Length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).</summary>
    public const int IdBytes = 20;

    /// <summary>Most sectors one DISCARD or WRITE_ZEROES segment may cover (64 MiB): bounds the
    /// time one request holds the device.</summary>
    public const uint MaxDiscardSectors = 1u << 17;

    /// <summary>Most segments in one DISCARD or WRITE_ZEROES request.</summary>
    public const int MaxDiscardSegments = 8;

    /// <summary>Most request queues a device can have (one pending bit each in the worker).</summary>
    public const int MaxQueues = 64;

    private const int ConfigSize = 60; // through write_zeroes_may_unmap + unused1 (§5.2.4)
    private const int MaxDirectChunk = 1 << 20; // one back-end call per MiB of a direct buffer
    private const int BounceSize = 64 * 1024;

    private static int s_workers;

    private readonly IBlockDevice _disk;
    private readonly bool _readOnly;
    private readonly ushort _queueSize;
    private readonly int _numQueues;
    private readonly byte[] _id = new byte[IdBytes];
    
    // Guards everything below. Held by the worker for one request at a time.
    private readonly Lock _lock = new();
    private readonly DescriptorChain _chain;
    private readonly VirtioDeviceCore _core;
    private readonly byte[] _bounce = new byte[BounceSize];
    private readonly NativeBuffer[] _iov;
    private readonly DiscardSegment[] _segments = new DiscardSegment[MaxDiscardSegments];
    private bool _writeThrough;
    private BlockWorker? _worker;
    private bool _disposed;

    private long _requests;
    private long _ioErrors;
    private long _unsupported;
    private long _bytesRead;
    private long _bytesWritten;

    /// <summary>Creates the device.</summary>
    /// <param name="disk">The back end; the device does not dispose it.</param>
    /// <param name="serial">GET_ID answer: ASCII, at most <see cref="IdBytes"/> bytes (longer is
    /// cut), padded with NULs, e.g. "kvmsharp-disk0".</param>
    /// <param name="readOnly">Offer VIRTIO_BLK_F_RO and refuse writes even when the back end is
    /// writable. A read-only back end always gives a read-only device.</param>
    /// <param name="queueSize">Maximum size of the request queue (a power of two up to 32768).</param>
    /// <param name="log">Where guest-caused errors are reported, rate-limited; null for none.</param>
    /// <exception cref="ArgumentNullException"><paramref name="disk"/> or <paramref name="serial"/> is null.</exception>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="queueSize"/> is invalid or below 4.</exception>
    public VirtioBlock(IBlockDevice disk, string serial, bool readOnly = false, ushort queueSize = 256, RateLimitedLog? log = null)
        : this(disk, serial, readOnly, queueSize, 1, log)
    {
    }

    /// <summary>Creates the device with <paramref name="numQueues"/> request queues
    /// (VIRTIO_BLK_F_MQ when more than one). All queues are served by the disk's one worker under
    /// one lock, so more queues only spare the guest its own lock contention.</summary>
    /// <param name="disk">The back end; the device does not dispose it.</param>
    /// <param name="serial">GET_ID answer (see the other constructor).</param>
    /// <param name="readOnly">Refuse writes even when the back end is writable.</param>
    /// <param name="queueSize">Maximum size of each request queue.</param>
    /// <param name="numQueues">Number of request queues, 1 to <see cref="MaxQueues"/>.</param>
    /// <param name="log">Where guest-caused errors are reported, rate-limited; null for none.</param>
    /// <exception cref="ArgumentNullException"><paramref name="disk"/> or <paramref name="serial"/> is null.</exception>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="queueSize"/> or
    /// <paramref name="numQueues"/> is out of range.</exception>
    public VirtioBlock(IBlockDevice disk, string serial, bool readOnly, ushort queueSize, int numQueues, RateLimitedLog? log = null)
    {
        ArgumentNullException.ThrowIfNull(disk);
        ArgumentNullException.ThrowIfNull(serial);
        ArgumentOutOfRangeException.ThrowIfLessThan(queueSize, (ushort)4);
        ArgumentOutOfRangeException.ThrowIfLessThan(numQueues, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(numQueues, MaxQueues);
        _numQueues = numQueues;
        VirtQueue.ValidateMaxSize(queueSize);
        _disk = disk;
        _readOnly = readOnly || disk.ReadOnly;
        _queueSize = queueSize;
        _chain = new DescriptorChain(queueSize);
        _iov = new NativeBuffer[queueSize];
        _core = new VirtioDeviceCore("virtio-blk", numQueues, log);
        int n = Encoding.ASCII.GetBytes(serial.AsSpan(0, Math.Min(serial.Length, IdBytes)), _id);
        _id.AsSpan(n).Clear();
    }

    /// <inheritdoc/>
    public uint DeviceType => VirtioDeviceType.Block;

    /// <inheritdoc/>
    public ulong DeviceFeatures
    {
        get
        {
            ulong f = VirtioFeatures.VERSION_1 | VirtioFeatures.RING_INDIRECT_DESC | VirtioFeatures.RING_EVENT_IDX
                | VirtioBlockFeatures.SEG_MAX | VirtioBlockFeatures.BLK_SIZE | VirtioBlockFeatures.FLUSH;
            if (_numQueues > 1)
                f |= VirtioBlockFeatures.MQ;
            if (_readOnly)
                f |= VirtioBlockFeatures.RO;
            else
                f |= VirtioBlockFeatures.DISCARD | VirtioBlockFeatures.WRITE_ZEROES;
            return f;
        }
    }

    /// <inheritdoc/>
    public int QueueCount => _numQueues;

    /// <summary>True when writes are refused (VIRTIO_BLK_F_RO offered).</summary>
    public bool ReadOnly => _readOnly;

    /// <summary>Disk size in 512-byte sectors (a partial last sector is not addressable).</summary>
    public ulong CapacitySectors => _disk.Size / SectorSize;

    /// <summary>Most data segments per request (seg_max): the queue size less header and status.</summary>
    public uint SegMax => (uint)_queueSize - 2;

    /// <summary>Requests completed (any status) since creation.</summary>
    public long Requests => Interlocked.Read(ref _requests);

    /// <summary>Requests answered VIRTIO_BLK_S_IOERR (bad framing, out of range, back-end failure).</summary>
    public long IoErrors => Interlocked.Read(ref _ioErrors);

    /// <summary>Requests answered VIRTIO_BLK_S_UNSUPP.</summary>
    public long Unsupported => Interlocked.Read(ref _unsupported);

    /// <summary>Malformed chains and requests without a writable status byte (returned with length 0).</summary>
    public long BadChains => _core.BadChains;

    /// <summary>Bytes read from the disk for the guest.</summary>
    public long BytesRead => Interlocked.Read(ref _bytesRead);

    /// <summary>Bytes written to the disk by the guest.</summary>
    public long BytesWritten => Interlocked.Read(ref _bytesWritten);

    /// <summary>True after the driver corrupted the ring; cleared by reset.</summary>
    public bool Broken => _core.Broken;

    /// <inheritdoc/>
    public ushort QueueMaxSize(int index) => _queueSize;

    /// <inheritdoc/>
    /// <remarks>struct virtio_blk_config (§5.2.4), little-endian.</remarks>
    public void ReadConfig(ulong offset, Span<byte> data)
    {
        Span<byte> config = stackalloc byte[ConfigSize];
        config.Clear();
        BinaryPrimitives.WriteUInt64LittleEndian(config, CapacitySectors);          // capacity
        BinaryPrimitives.WriteUInt32LittleEndian(config[12..], SegMax);             // seg_max
        BinaryPrimitives.WriteUInt32LittleEndian(config[20..], SectorSize);         // blk_size
        BinaryPrimitives.WriteUInt16LittleEndian(config[34..], (ushort)_numQueues); // num_queues
        BinaryPrimitives.WriteUInt32LittleEndian(config[36..], MaxDiscardSectors);  // max_discard_sectors
        BinaryPrimitives.WriteUInt32LittleEndian(config[40..], MaxDiscardSegments); // max_discard_seg
        BinaryPrimitives.WriteUInt32LittleEndian(config[44..], 1);                  // discard_sector_alignment
        BinaryPrimitives.WriteUInt32LittleEndian(config[48..], MaxDiscardSectors);  // max_write_zeroes_sectors
        BinaryPrimitives.WriteUInt32LittleEndian(config[52..], MaxDiscardSegments); // max_write_zeroes_seg
        config[56] = 1;                                                             // write_zeroes_may_unmap
        VirtioConfigSpace.Read(config, offset, data);
    }

    /// <inheritdoc/>
    /// <remarks>Every field is read-only without VIRTIO_BLK_F_CONFIG_WCE, which is not offered.</remarks>
    public void WriteConfig(ulong offset, ReadOnlySpan<byte> data)
    {
    }

    /// <inheritdoc/>
    public bool Activate(GuestMemory memory, ulong negotiatedFeatures, IReadOnlyList<VirtQueue> queues, IVirtioInterrupt interrupt)
    {
        lock (_lock)
        {
            // The driver may use fewer queues than offered (Linux: at most one per CPU); the
            // unused ones are never made ready and are ignored.
            if (!_core.Activate(memory, negotiatedFeatures, queues, interrupt, requiredQueues: 1))
                return false;
            _writeThrough = (negotiatedFeatures & VirtioBlockFeatures.FLUSH) == 0;
        }
        return true;
    }

    /// <inheritdoc/>
    /// <remarks>Waits for the request in flight, if any (see the class remarks).</remarks>
    public void Reset()
    {
        lock (_lock)
            _core.Reset();
    }

    /// <inheritdoc/>
    /// <remarks>Wakes the disk's worker; never does I/O on the calling thread.</remarks>
    public bool QueueNotify(int queueIndex)
    {
        if ((uint)queueIndex >= (uint)_numQueues)
            return false;
        BlockWorker? worker;
        lock (_lock)
            worker = _disposed ? null : _worker ??= new BlockWorker(ProcessQueue, $"blk{Interlocked.Increment(ref s_workers) - 1}");
        worker?.Post(queueIndex);
        return false;
    }

    /// <summary>Blocks until the worker has served every kick that came before the call (for
    /// pause and snapshot, and for tests).</summary>
    public void WaitIdle() => Volatile.Read(ref _worker)?.WaitIdle();

    /// <summary>
    /// Serves every available request of queue <paramref name="queueIndex"/>, one request per
    /// hold of the device lock, then signals the driver if it wants it. Runs on the worker;
    /// indices of absent or unused queues are ignored.
    /// </summary>
    public void ProcessQueue(int queueIndex = 0)
    {
        bool used = false;
        while (true)
        {
            lock (_lock)
            {
                if (!_core.TryGetQueue(queueIndex, out VirtQueue? queue, out GuestMemory? memory, out IVirtioInterrupt? interrupt))
                    return;
                PopResult result = queue.TryPop(memory, _chain);
                if (result == PopResult.Empty)
                {
                    // Ask for the next kick, then look once more: buffers added meanwhile may never be kicked (§2.7.10).
                    if (queue.EnableNotification(memory))
                        continue;
                    if (used && queue.NeedsNotification(memory))
                        interrupt.Signal(VirtioInterruptType.Queue, queueIndex);
                    return;
                }
                uint written = 0;
                if (result == PopResult.Chain)
                    written = Execute(memory);
                else if (result == PopResult.BadChain)
                    _core.BadChain(_chain.Head);
                if (result == PopResult.BrokenRing || !queue.TryAddUsed(memory, _chain.Head, written))
                {
                    _core.MarkBroken(interrupt, queueIndex);
                    return;
                }
                used = true;
            }
        }
    }

    /// <summary>Stops the worker (after the request in flight).</summary>
    public void Dispose()
    {
        BlockWorker? worker;
        lock (_lock)
        {
            _disposed = true;
            worker = _worker;
        }
        worker?.Dispose();
    }

    /// <summary>Parses, executes and writes the status of the request in <see cref="_chain"/>.</summary>
    /// <returns>The used length: payload bytes written into the guest plus the status byte, or 0
    /// when the chain has no writable byte to carry a status.</returns>
    private uint Execute(GuestMemory memory)
    {
        if (!BlockRequest.Parse(memory, _chain, CapacitySectors, _readOnly, _segments, MaxDiscardSectors, out BlockRequest request))
        {
            _core.BadChain(_chain.Head, "request without a writable status byte");
            return 0;
        }
        uint payload = 0;
        byte status = request.Status;
        if (status == BlockRequest.VIRTIO_BLK_S_OK)
            status = Run(memory, request, ref payload);
        else
            _core.Log?.Write(request.Error!, request.ErrorValue);
        Interlocked.Increment(ref _requests);
        if (status == BlockRequest.VIRTIO_BLK_S_IOERR)
            Interlocked.Increment(ref _ioErrors);
        else if (status == BlockRequest.VIRTIO_BLK_S_UNSUPP)
            Interlocked.Increment(ref _unsupported);
        if (!memory.TryWrite(request.StatusAddress, status))
        {
            _core.BadChain(_chain.Head, "status byte no longer in RAM");
            return 0;
        }
        return payload + 1;
    }

    /// <summary>Executes a parsed request against the back end.</summary>
    private byte Run(GuestMemory memory, in BlockRequest request, ref uint payload)
    {
        switch (request.Type)
        {
            case BlockRequest.VIRTIO_BLK_T_IN:
                return TransferIn(memory, request.Offset, request.Length, ref payload);
            case BlockRequest.VIRTIO_BLK_T_OUT:
                return TransferOut(memory, request.Offset, request.Length);
            case BlockRequest.VIRTIO_BLK_T_FLUSH:
                return Backend(BackendOp.Flush, 0, 0);
            case BlockRequest.VIRTIO_BLK_T_GET_ID:
                var writer = new ChainWriter(memory, _chain);
                writer.Write(_id.AsSpan(0, (int)Math.Min(request.Length, (uint)IdBytes)));
                payload = writer.BytesWritten;
                return BlockRequest.VIRTIO_BLK_S_OK;
            default: // DISCARD, WRITE_ZEROES: every segment was checked by Parse
                for (int i = 0; i < request.SegmentCount; i++)
                {
                    ulong offset = _segments[i].Sector * SectorSize;
                    ulong length = (ulong)_segments[i].NumSectors * SectorSize;
                    if (length == 0)
                        continue;
                    // IBlockDevice.Discard leaves the range reading as zeros, so WRITE_ZEROES with UNMAP
                    // may use it (§5.2.6.1: the device MAY deallocate).
                    bool unmap = request.Type == BlockRequest.VIRTIO_BLK_T_DISCARD
                        || (_segments[i].Flags & BlockRequest.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) != 0;
                    byte s = Backend(unmap ? BackendOp.Discard : BackendOp.WriteZeroes, offset, length);
                    if (s != BlockRequest.VIRTIO_BLK_S_OK)
                        return s;
                }
                return BlockRequest.VIRTIO_BLK_S_OK;
        }
    }

    private byte Refuse(string message)
    {
        _core.Log?.Write(message, _chain.Head);
        return BlockRequest.VIRTIO_BLK_S_IOERR;
    }

    /// <summary>Runs a back-end call, mapping its failures to IOERR (and flushing in write-through mode).</summary>
    private byte Backend(BackendOp op, ulong offset, ulong length)
    {
        try
        {
            switch (op)
            {
                case BackendOp.Flush:
                    _disk.Flush();
                    break;
                case BackendOp.Discard:
                    _disk.Discard(offset, length);
                    break;
                default:
                    _disk.WriteZeroes(offset, length);
                    break;
            }
            if (op != BackendOp.Flush && _writeThrough)
                _disk.Flush();
            return BlockRequest.VIRTIO_BLK_S_OK;
        }
        catch (Exception e) when (IsBackendFailure(e))
        {
            _core.Log?.Write($"virtio-blk: back-end failure at byte {offset}: {e.Message}");
            return BlockRequest.VIRTIO_BLK_S_IOERR;
        }
    }

    private enum BackendOp
    {
        Flush,
        Discard,
        WriteZeroes,
    }

    private static bool IsBackendFailure(Exception e) =>
        e is ImageException or IOException or ObjectDisposedException or UnauthorizedAccessException or NotSupportedException;

    /// <summary>
    /// Lists the guest buffers holding <paramref name="length"/> payload bytes after the first
    /// <paramref name="skip"/> bytes of <paramref name="segments"/> in <see cref="_iov"/>, as host
    /// memory. False when one straddles two RAM regions (the caller then bounces it). The chain
    /// was validated when it was popped, so every segment lies in RAM.
    /// </summary>
    private bool TryGather(GuestMemory memory, ReadOnlySpan<ChainSegment> segments, uint skip, uint length, out int count)
    {
        count = 0;
        foreach (ChainSegment s in segments)
        {
            if (length == 0)
                break;
            if (skip >= s.Length)
            {
                skip -= s.Length;
                continue;
            }
            uint take = Math.Min(s.Length - skip, length);
            if (take > int.MaxValue || count == _iov.Length
                || !memory.TryGetSpan(new GuestAddress(s.Address.Value + skip), (int)take, out Span<byte> span))
                return false;
            _iov[count++] = new NativeBuffer(span);
            length -= take;
            skip = 0;
        }
        return length == 0;
    }

    /// <summary>Reads <paramref name="length"/> bytes of the disk at <paramref name="offset"/> into
    /// the writable buffers (the status byte excluded).</summary>
    private byte TransferIn(GuestMemory memory, ulong offset, uint length, ref uint payload)
    {
        try
        {
            // The usual case: every buffer lies in one RAM region, so the whole request is one
            // preadv (128 pread calls per 512 KiB request otherwise).
            if (TryGather(memory, _chain.Writable, skip: 0, length, out int buffers))
            {
                _disk.ReadScattered(_iov.AsSpan(0, buffers), offset);
                payload += length;
                Interlocked.Add(ref _bytesRead, length);
                return BlockRequest.VIRTIO_BLK_S_OK;
            }
            uint left = length;
            foreach (ChainSegment s in _chain.Writable)
            {
                if (left == 0)
                    break;
                uint segLength = Math.Min(s.Length, left);
                uint done = 0;
                while (done < segLength)
                {
                    var address = new GuestAddress(s.Address.Value + done);
                    int chunk = (int)Math.Min(segLength - done, (uint)MaxDirectChunk);
                    if (memory.TryGetSpan(address, chunk, out Span<byte> direct))
                    {
                        _disk.Read(direct, offset);
                    }
                    else
                    {
                        // The buffer straddles two RAM regions: bounce.
                        chunk = Math.Min(chunk, _bounce.Length);
                        Span<byte> bounce = _bounce.AsSpan(0, chunk);
                        _disk.Read(bounce, offset);
                        if (!memory.TryWrite(address, bounce))
                            return Refuse("virtio-blk: IN buffer left RAM, head ");
                    }
                    done += (uint)chunk;
                    offset += (uint)chunk;
                    payload += (uint)chunk;
                }
                left -= segLength;
            }
            Interlocked.Add(ref _bytesRead, length);
            return BlockRequest.VIRTIO_BLK_S_OK;
        }
        catch (Exception e) when (IsBackendFailure(e))
        {
            _core.Log?.Write($"virtio-blk: read failed at byte {offset}: {e.Message}");
            return BlockRequest.VIRTIO_BLK_S_IOERR;
        }
    }

    /// <summary>Writes the readable bytes after the header to the disk at <paramref name="offset"/>.</summary>
    private byte TransferOut(GuestMemory memory, ulong offset, uint length)
    {
        try
        {
            if (TryGather(memory, _chain.Readable, skip: BlockRequest.HeaderSize, length, out int buffers))
            {
                _disk.WriteGathered(_iov.AsSpan(0, buffers), offset);
                if (_writeThrough)
                    _disk.Flush();
                Interlocked.Add(ref _bytesWritten, length);
                return BlockRequest.VIRTIO_BLK_S_OK;
            }
            uint skip = BlockRequest.HeaderSize;
            foreach (ChainSegment s in _chain.Readable)
            {
                if (skip >= s.Length)
                {
                    skip -= s.Length;
                    continue;
                }
                uint done = skip;
                skip = 0;
                while (done < s.Length)
                {
                    var address = new GuestAddress(s.Address.Value + done);
                    int chunk = (int)Math.Min(s.Length - done, (uint)MaxDirectChunk);
                    // Payload only: the guest may change it while we copy, which harms only its
                    // own data (style.md §5).
                    if (memory.TryGetSpan(address, chunk, out Span<byte> direct))
                    {
                        _disk.Write(direct, offset);
                    }
                    else
                    {
                        chunk = Math.Min(chunk, _bounce.Length);
                        Span<byte> bounce = _bounce.AsSpan(0, chunk);
                        if (!memory.TryRead(address, bounce))
                            return Refuse("virtio-blk: OUT buffer left RAM, head ");
                        _disk.Write(bounce, offset);
                    }
                    done += (uint)chunk;
                    offset += (uint)chunk;
                }
            }
            if (_writeThrough)
                _disk.Flush();
            Interlocked.Add(ref _bytesWritten, length);
            return BlockRequest.VIRTIO_BLK_S_OK;
        }
        catch (Exception e) when (IsBackendFailure(e))
        {
            _core.Log?.Write($"virtio-blk: write failed at byte {offset}: {e.Message}");
            return BlockRequest.VIRTIO_BLK_S_IOERR;
        }
    }
}
