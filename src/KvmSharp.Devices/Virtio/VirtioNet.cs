using System.Buffers.Binary;
using KvmSharp.Interop;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>Device-specific feature bits of virtio-net (virtio 1.2 §5.1.3).</summary>
public static class VirtioNetFeatures
{
    public const ulong CSUM = 1UL << 0;
    public const ulong GUEST_CSUM = 1UL << 1;
    public const ulong CTRL_GUEST_OFFLOADS = 1UL << 2;
    public const ulong MTU = 1UL << 3;
    public const ulong MAC = 1UL << 5;
    public const ulong GUEST_TSO4 = 1UL << 7;
    public const ulong GUEST_TSO6 = 1UL << 8;
    public const ulong GUEST_ECN = 1UL << 9;
    public const ulong GUEST_UFO = 1UL << 10;
    public const ulong HOST_TSO4 = 1UL << 11;
    public const ulong HOST_TSO6 = 1UL << 12;
    public const ulong HOST_ECN = 1UL << 13;
    public const ulong HOST_UFO = 1UL << 14;
    public const ulong MRG_RXBUF = 1UL << 15;
    public const ulong STATUS = 1UL << 16;
    public const ulong CTRL_VQ = 1UL << 17;
}

/// <summary>What <see cref="VirtioNet.ProcessRx"/> stopped on: tells the VMM when to call again.</summary>
public enum NetRxStatus
{
    /// <summary>The back end has no frame queued: call again when its fd becomes readable.</summary>
    BackendEmpty,

    /// <summary>A frame is waiting and the guest has posted no receive buffer: call again on the
    /// receive queue's notification (<see cref="IVirtioDevice.QueueNotify"/> does it). With a level-triggered fd, stop polling the back end until then.</summary>
    WaitingForBuffers,

    /// <summary>The per-call frame budget ran out with work left: call again soon (after other
    /// ready events), since an edge-triggered fd will not report it again.</summary>
    MoreWork,

    /// <summary>The device is not running (not activated, reset, or broken by the driver).</summary>
    NotRunning,
}

/// <summary>
/// virtio network device (virtio 1.2 §5.1): one receive and one transmit queue (receiveq1 = 0,
/// transmitq1 = 1), no control queue, frames exchanged with an <see cref="INetBackend"/> (a TAP).
/// </summary>
/// <remarks>
/// <para>Features: VERSION_1, MAC, STATUS (link up), CSUM, GUEST_CSUM, HOST_TSO4/6, HOST_ECN,
/// GUEST_TSO4/6, GUEST_ECN, MRG_RXBUF, RING_EVENT_IDX, RING_INDIRECT_DESC. The 12-byte
/// virtio_net_hdr_v1 passes between guest and TAP as is; the guest's GUEST_* offloads are handed
/// to the back end at activation (TUNSETOFFLOAD) so the TAP never sends what the guest can't take.</para>
/// <para>Transmit: <see cref="ProcessTx"/> (on the transmit queue's notification) gathers each
/// chain into one reused buffer and writes it to the back end; every chain is returned with
/// length 0. Receive: <see cref="ProcessRx"/> (when the back end is readable, and on the receive
/// queue's notification) reads frames into a reused buffer and copies each into one chain, or
/// with MRG_RXBUF into as many chains as it takes (num_buffers, §5.1.6.4). A frame that finds
/// no buffer is kept until the guest posts some. No allocation per frame.</para>
/// <para>Hostile guests (style.md §5): malformed chains, transmit chains with device-writable
/// buffers or shorter than the header, receive chains with no room for the header are returned
/// with length 0 and counted (<see cref="BadChains"/>); an impossible ring stops the device until
/// reset (<see cref="Broken"/>). Nothing a guest does makes a method throw.</para>
/// <para>Threads: transmit and receive each have a lock, so a vCPU sending while the I/O thread
/// receives does not wait; <see cref="Activate"/>/<see cref="Reset"/> take both (receive, then
/// transmit). The interrupt is signalled under the queue's lock (it never blocks).</para>
/// </remarks>
public sealed class VirtioNet : IVirtioDevice
{
    /// <summary>Index of receiveq1.</summary>
    public const int RxQueueIndex = 0;

    /// <summary>Index of transmitq1.</summary>
    public const int TxQueueIndex = 1;

    /// <summary>Size of struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6), num_buffers included.</summary>
    public const int HeaderSize = 12;

    /// <summary>Largest Ethernet frame (without the vnet header) carried either way: a 64 KiB
    /// GSO packet plus link-layer headers. Larger ones are dropped.</summary>
    public const int MaxFrameSize = 65536 + 64;

    /// <summary>Frames shorter than an Ethernet header are dropped.</summary>
    public const int MinFrameSize = 14;

    /// <summary>Frames handled per <see cref="ProcessRx"/> call before it returns
    /// <see cref="NetRxStatus.MoreWork"/>.</summary>
    public const int RxBudget = 256;

    // virtio 1.2 §5.1.4.
    private const ushort VIRTIO_NET_S_LINK_UP = 1;
    private const int ConfigSize = 10; // mac[6], status, max_virtqueue_pairs
    private const int NumBuffersOffset = 10;

    private const ulong OfferedFeatures =
        VirtioFeatures.VERSION_1 | VirtioFeatures.RING_INDIRECT_DESC | VirtioFeatures.RING_EVENT_IDX
        | VirtioNetFeatures.MAC | VirtioNetFeatures.STATUS | VirtioNetFeatures.MRG_RXBUF
        | VirtioNetFeatures.CSUM | VirtioNetFeatures.HOST_TSO4 | VirtioNetFeatures.HOST_TSO6 | VirtioNetFeatures.HOST_ECN
        | VirtioNetFeatures.GUEST_CSUM | VirtioNetFeatures.GUEST_TSO4 | VirtioNetFeatures.GUEST_TSO6 | VirtioNetFeatures.GUEST_ECN;

    private readonly INetBackend _backend;
    private readonly VirtioDeviceCore _core; // written under both locks, read under either
    private readonly ushort _queueSize;
    private readonly byte[] _mac;
    private int _linkUp = 1;

    // Lock order: _rxLock, then _txLock. Activate/Reset take both.
    private readonly Lock _rxLock = new();
    private readonly Lock _txLock = new();

    // Set under both locks; read under either.
    private bool _mergeable;

    // Transmit state (under _txLock).
    private readonly DescriptorChain _txChain;
    private readonly byte[] _txBuffer = new byte[HeaderSize + MaxFrameSize];
    private readonly ChainHandler _transmit;

    // Receive state (under _rxLock).
    private readonly DescriptorChain _rxChain;
    private readonly byte[] _rxBuffer = new byte[HeaderSize + MaxFrameSize];
    private int _rxLength;          // > 0: a frame (header included) waits in _rxBuffer
    private int _rxOffset;          // bytes of it already copied into guest buffers
    private bool _rxChainHeld;      // without MRG_RXBUF: _rxChain was popped and not used yet
    private readonly (ushort Head, uint Length)[] _rxUsed;  // chains filled for the current frame
    private int _rxUsedCount;
    private readonly ushort[] _rxDeferredBad;               // bad chains met mid-frame, returned after it
    private int _rxDeferredBadCount;
    private GuestAddress _numBuffersLow, _numBuffersHigh;  // where num_buffers sits in the frame's first chain

    private long _txFrames, _txBytes, _txErrors, _rxFrames, _rxBytes, _rxDropped;

    /// <summary>Creates the device.</summary>
    /// <param name="backend">Where frames go and come from; not owned.</param>
    /// <param name="mac">The MAC address shown in configuration space (6 bytes, unicast).</param>
    /// <param name="queueSize">Maximum size of each queue (a power of two up to 32768).</param>
    /// <param name="log">Where rate-limited messages about guest errors and back-end failures go.</param>
    /// <exception cref="ArgumentException">The MAC is not 6 bytes or is a multicast address.</exception>
    /// <exception cref="ArgumentOutOfRangeException">The queue size is invalid.</exception>
    public VirtioNet(INetBackend backend, ReadOnlySpan<byte> mac, ushort queueSize = 256, RateLimitedLog? log = null)
    {
        ArgumentNullException.ThrowIfNull(backend);
        if (mac.Length != 6)
            throw new ArgumentException("A MAC address is 6 bytes.", nameof(mac));
        if ((mac[0] & 1) != 0)
            throw new ArgumentException("A device MAC address must be unicast (bit 0 of the first byte clear).", nameof(mac));
        VirtQueue.ValidateMaxSize(queueSize);
        _backend = backend;
        _mac = mac.ToArray();
        _queueSize = queueSize;
        _core = new VirtioDeviceCore("virtio-net", 2, log);
        _transmit = Transmit;
        _txChain = new DescriptorChain(queueSize);
        _rxChain = new DescriptorChain(queueSize);
        _rxUsed = new (ushort, uint)[queueSize];
        _rxDeferredBad = new ushort[queueSize];
    }

    /// <inheritdoc/>
    public uint DeviceType => VirtioDeviceType.Net;

    /// <inheritdoc/>
    public ulong DeviceFeatures => OfferedFeatures;

    /// <inheritdoc/>
    public int QueueCount => 2;

    /// <summary>The MAC address in configuration space.</summary>
    public ReadOnlySpan<byte> Mac => _mac;

    /// <summary>Frames written to the back end.</summary>
    public long TxFrames => Interlocked.Read(ref _txFrames);

    /// <summary>Bytes of frames (without vnet headers) written to the back end.</summary>
    public long TxBytes => Interlocked.Read(ref _txBytes);

    /// <summary>Transmit frames the back end refused (write failed).</summary>
    public long TxErrors => Interlocked.Read(ref _txErrors);

    /// <summary>Frames delivered to the guest.</summary>
    public long RxFrames => Interlocked.Read(ref _rxFrames);

    /// <summary>Bytes of frames (without vnet headers) delivered to the guest.</summary>
    public long RxBytes => Interlocked.Read(ref _rxBytes);

    /// <summary>Received frames dropped: truncated or runt frames from the back end, frames
    /// larger than the guest's buffer (without MRG_RXBUF) or than its whole ring.</summary>
    public long RxDropped => Interlocked.Read(ref _rxDropped);

    /// <summary>Malformed or misdirected chains returned unused, both queues.</summary>
    public long BadChains => _core.BadChains;

    /// <summary>True after the driver corrupted a ring; cleared by reset.</summary>
    public bool Broken => _core.Broken;

    /// <summary>
    /// The link state in the status field (VIRTIO_NET_S_LINK_UP). Changing it while the device
    /// runs raises a configuration-change interrupt (virtio 1.2 §5.1.4.2).
    /// </summary>
    public bool LinkUp
    {
        get => Volatile.Read(ref _linkUp) != 0;
        set
        {
            if (Interlocked.Exchange(ref _linkUp, value ? 1 : 0) == (value ? 1 : 0))
                return;
            IVirtioInterrupt? interrupt;
            lock (_rxLock)
                interrupt = _core.Interrupt;
            interrupt?.Signal(VirtioInterruptType.Config, 0);
        }
    }

    /// <inheritdoc/>
    public ushort QueueMaxSize(int index) => _queueSize;

    /// <inheritdoc/>
    /// <remarks>struct virtio_net_config (virtio 1.2 §5.1.4): mac, status, max_virtqueue_pairs = 1;
    /// the rest reads 0.</remarks>
    public void ReadConfig(ulong offset, Span<byte> data)
    {
        data.Clear();
        Span<byte> config = stackalloc byte[ConfigSize];
        _mac.CopyTo(config);
        BinaryPrimitives.WriteUInt16LittleEndian(config[6..], LinkUp ? VIRTIO_NET_S_LINK_UP : (ushort)0);
        BinaryPrimitives.WriteUInt16LittleEndian(config[8..], 1);
        if (offset >= ConfigSize)
            return;
        ReadOnlySpan<byte> source = config[(int)offset..];
        source[..Math.Min(source.Length, data.Length)].CopyTo(data);
    }

    /// <inheritdoc/>
    /// <remarks>Every field is read-only for a VERSION_1 driver (the MAC is writable only through
    /// the control queue, which this device does not offer).</remarks>
    public void WriteConfig(ulong offset, ReadOnlySpan<byte> data)
    {
    }

    /// <inheritdoc/>
    /// <remarks>Fails (the transport sets DEVICE_NEEDS_RESET) when a queue is not ready or the
    /// back end refuses the guest's receive offloads.</remarks>
    public bool Activate(GuestMemory memory, ulong negotiatedFeatures, IReadOnlyList<VirtQueue> queues, IVirtioInterrupt interrupt)
    {
        lock (_rxLock)
        {
            lock (_txLock)
            {
                if (!_core.Activate(memory, negotiatedFeatures, queues, interrupt, requiredQueues: 2))
                    return false;
                try
                {
                    _backend.SetOffloads(OffloadsFor(negotiatedFeatures));
                }
                catch (IOException e)
                {
                    _core.Reset();
                    _core.Log?.Write($"virtio-net: the back end refused the guest's offloads: {e.Message}");
                    return false;
                }
                _mergeable = (negotiatedFeatures & VirtioNetFeatures.MRG_RXBUF) != 0;
                ClearState();
            }
        }
        return true;
    }

    /// <inheritdoc/>
    /// <remarks>A frame waiting for receive buffers is discarded.</remarks>
    public void Reset()
    {
        lock (_rxLock)
        {
            lock (_txLock)
            {
                _core.Reset();
                _mergeable = false;
                ClearState();
            }
        }
    }

    private void ClearState()
    {
        _rxLength = 0;
        _rxOffset = 0;
        _rxChainHeld = false;
        _rxUsedCount = 0;
        _rxDeferredBadCount = 0;
    }

    /// <summary>The TUN_F_* flags matching the guest's receive features (virtio 1.2 §5.1.3.1:
    /// TSO and ECN need GUEST_CSUM; the kernel refuses TSO without CSUM too).</summary>
    public static TapOffloads OffloadsFor(ulong negotiatedFeatures)
    {
        if ((negotiatedFeatures & VirtioNetFeatures.GUEST_CSUM) == 0)
            return TapOffloads.None;
        TapOffloads offloads = TapOffloads.Csum;
        if ((negotiatedFeatures & VirtioNetFeatures.GUEST_TSO4) != 0)
            offloads |= TapOffloads.Tso4;
        if ((negotiatedFeatures & VirtioNetFeatures.GUEST_TSO6) != 0)
            offloads |= TapOffloads.Tso6;
        if ((offloads & (TapOffloads.Tso4 | TapOffloads.Tso6)) != 0 && (negotiatedFeatures & VirtioNetFeatures.GUEST_ECN) != 0)
            offloads |= TapOffloads.TsoEcn;
        if ((negotiatedFeatures & VirtioNetFeatures.GUEST_UFO) != 0)
            offloads |= TapOffloads.Ufo;
        return offloads;
    }

    /// <inheritdoc/>
    /// <remarks>Processes the queue at once (both paths are non-blocking): receive buffers posted
    /// let a waiting frame in; transmit chains are sent. True when the receive budget ran out.</remarks>
    public bool QueueNotify(int queueIndex)
    {
        if (queueIndex == RxQueueIndex)
            return ProcessRx() == NetRxStatus.MoreWork;
        if (queueIndex == TxQueueIndex)
            ProcessTx();
        return false;
    }

    // ---------------------------------------------------------------- transmit

    /// <summary>
    /// Sends every available transmit chain to the back end, then signals the driver if it wants
    /// it. Call on the transmit queue's notification (its ioeventfd, or through
    /// <see cref="QueueNotify"/>).
    /// </summary>
    public void ProcessTx()
    {
        lock (_txLock)
        {
            _core.Serve(TxQueueIndex, _txChain, _transmit);
        }
    }

    /// <remarks>§5.1.6.2: the device writes nothing into a transmit buffer.</remarks>
    private uint Transmit(GuestMemory memory, DescriptorChain chain)
    {
        uint length = chain.ReadableLength;
        // §5.1.6.2: a transmit chain is the header and the frame, all device-readable.
        if (chain.WritableLength != 0)
        {
            _core.BadChain(chain.Head, "transmit chain has device-writable buffers");
            return 0;
        }
        if (length < HeaderSize + MinFrameSize || length > (uint)_txBuffer.Length)
        {
            _core.BadChain(chain.Head, "transmit chain length is outside [26, 65612]");
            return 0;
        }
        var reader = new ChainReader(memory, chain);
        Span<byte> frame = _txBuffer.AsSpan(0, (int)length);
        if (reader.Read(frame) != frame.Length)
        {
            _core.BadChain(chain.Head, "transmit chain could not be read");
            return 0;
        }
        // The TAP takes virtio_net_hdr_v1 as is (flags, gso_type, hdr_len, gso_size,
        // csum_start, csum_offset; num_buffers is ignored on transmit) and validates it itself.
        int n = _backend.Write(frame);
        if (n < 0)
        {
            Interlocked.Increment(ref _txErrors);
            _core.Log?.Write("virtio-net: back end write failed, frame dropped: errno ", (ulong)-n);
            return 0;
        }
        Interlocked.Increment(ref _txFrames);
        Interlocked.Add(ref _txBytes, length - HeaderSize);
        return 0;
    }

    // ---------------------------------------------------------------- receive

    /// <summary>
    /// Moves frames from the back end into the guest's receive buffers until the back end is
    /// empty, the guest has no buffers left (the frame in hand is kept for later), or
    /// <see cref="RxBudget"/> frames were handled; then signals the driver if it wants it.
    /// </summary>
    /// <remarks>Call when the back end's fd becomes readable, on the receive queue's notification
    /// (its ioeventfd, or through <see cref="QueueNotify"/>), and again when the result says so.</remarks>
    /// <returns>Why it stopped, and so when to call again.</returns>
    public NetRxStatus ProcessRx()
    {
        lock (_rxLock)
        {
            if (!_core.TryGetQueue(RxQueueIndex, out VirtQueue? queue, out GuestMemory? memory, out IVirtioInterrupt? interrupt))
                return NetRxStatus.NotRunning;
            bool used = false;
            int budget = RxBudget;
            NetRxStatus status;
            while (true)
            {
                if (_rxLength == 0)
                {
                    if (budget == 0)
                    {
                        status = NetRxStatus.MoreWork;
                        break;
                    }
                    if (!ReadFrame())
                    {
                        status = NetRxStatus.BackendEmpty;
                        break;
                    }
                    budget--;
                    if (_rxLength == 0)
                        continue; // dropped
                }
                DeliverResult delivered = _mergeable ? DeliverMergeable(queue, memory, ref used) : DeliverSingle(queue, memory, ref used);
                if (delivered == DeliverResult.Done)
                    continue;
                if (delivered == DeliverResult.Broken)
                {
                    status = NetRxStatus.NotRunning;
                    break;
                }
                // Out of buffers: ask for a kick, and look again for buffers that raced with the
                // request (§2.7.10), or the guest may never kick.
                if (!queue.EnableNotification(memory))
                {
                    status = NetRxStatus.WaitingForBuffers;
                    break;
                }
            }
            // Kicks are only needed while a frame waits for buffers (EnableNotification above);
            // otherwise spare the guest the exits (VIRTQ_USED_F_NO_NOTIFY; a no-op with EVENT_IDX).
            if (status is NetRxStatus.BackendEmpty or NetRxStatus.MoreWork)
                queue.DisableNotification(memory);
            if (used && !Broken && queue.NeedsNotification(memory))
                interrupt.Signal(VirtioInterruptType.Queue, RxQueueIndex);
            return status;
        }
    }

    private enum DeliverResult
    {
        Done,
        NoBuffers,
        Broken,
    }

    /// <summary>Reads the next frame into _rxBuffer; false when the back end has none.
    /// Leaves _rxLength 0 when the frame read was dropped.</summary>
    private bool ReadFrame()
    {
        int n = _backend.Read(_rxBuffer);
        if (n <= 0)
        {
            if (n < 0 && n != -Libc.EAGAIN)
                _core.Log?.Write("virtio-net: back end read failed: errno ", (ulong)-n);
            return false;
        }
        if (n > _rxBuffer.Length || n < HeaderSize + MinFrameSize)
        {
            Interlocked.Increment(ref _rxDropped);
            _core.Log?.Write("virtio-net: dropped a received frame of bad length ", (ulong)n);
            return true;
        }
        _rxLength = n;
        _rxOffset = 0;
        return true;
    }

    /// <summary>Without MRG_RXBUF: the whole frame goes into one chain (§5.1.6.3.1), num_buffers 1.</summary>
    private DeliverResult DeliverSingle(VirtQueue queue, GuestMemory memory, ref bool used)
    {
        DescriptorChain chain = _rxChain;
        while (!_rxChainHeld)
        {
            PopResult result = queue.TryPop(memory, chain);
            if (result == PopResult.Empty)
                return DeliverResult.NoBuffers;
            if (result == PopResult.BrokenRing)
            {
                _core.MarkBroken(_core.Interrupt, RxQueueIndex);
                return DeliverResult.Broken;
            }
            if (result == PopResult.Chain && chain.WritableLength >= HeaderSize)
            {
                _rxChainHeld = true;
                break;
            }
            _core.BadChain(chain.Head, result == PopResult.Chain ? "receive chain has no room for the header" : "receive chain is malformed or outside RAM");
            if (!AddUsed(queue, memory, chain.Head, 0, ref used))
                return DeliverResult.Broken;
        }

        if ((uint)_rxLength > chain.WritableLength)
        {
            // The guest posted buffers too small for this frame (it did not negotiate the GSO it
            // would need, or shrank its buffers): drop the frame, keep the chain for the next.
            Interlocked.Increment(ref _rxDropped);
            _core.Log?.Write("virtio-net: received frame larger than the guest's buffer, dropped: ", (ulong)_rxLength);
            _rxLength = 0;
            return DeliverResult.Done;
        }
        BinaryPrimitives.WriteUInt16LittleEndian(_rxBuffer.AsSpan(NumBuffersOffset), 1); // §5.1.6.4
        var writer = new ChainWriter(memory, chain);
        int written = writer.Write(_rxBuffer.AsSpan(0, _rxLength));
        _rxChainHeld = false;
        if (written != _rxLength)
        {
            // RAM disappeared under a checked chain: return what was written, count the frame lost.
            Interlocked.Increment(ref _rxDropped);
            _rxLength = 0;
            return AddUsed(queue, memory, chain.Head, 0, ref used) ? DeliverResult.Done : DeliverResult.Broken;
        }
        CountDelivered();
        _rxLength = 0;
        return AddUsed(queue, memory, chain.Head, (uint)written, ref used) ? DeliverResult.Done : DeliverResult.Broken;
    }

    /// <summary>
    /// With MRG_RXBUF: the frame fills as many chains as it needs (§5.1.6.4.1). Filled chains are
    /// remembered and returned together once the frame is complete and num_buffers written, so
    /// the driver never sees a first buffer whose companions are missing; a frame that runs out
    /// of buffers resumes where it stopped.
    /// </summary>
    private DeliverResult DeliverMergeable(VirtQueue queue, GuestMemory memory, ref bool used)
    {
        DescriptorChain chain = _rxChain;
        while (_rxOffset < _rxLength)
        {
            if (_rxUsedCount + _rxDeferredBadCount >= queue.Size)
            {
                // Every descriptor the driver can give us is held and the frame still does not
                // fit (tiny buffers): it never will. Give the buffers back empty, drop the frame.
                Interlocked.Increment(ref _rxDropped);
                _core.Log?.Write("virtio-net: received frame larger than the whole receive ring, dropped: ", (ulong)_rxLength);
                for (int i = 0; i < _rxUsedCount; i++)
                    _rxUsed[i].Length = 0;
                _rxLength = 0;
                return FlushUsed(queue, memory, ref used) ? DeliverResult.Done : DeliverResult.Broken;
            }
            PopResult result = queue.TryPop(memory, chain);
            if (result == PopResult.Empty)
                return DeliverResult.NoBuffers;
            if (result == PopResult.BrokenRing)
            {
                _core.MarkBroken(_core.Interrupt, RxQueueIndex);
                return DeliverResult.Broken;
            }
            bool first = _rxUsedCount == 0;
            if (result != PopResult.Chain || chain.WritableLength < (first ? HeaderSize : 1) || (first && !FindNumBuffers(chain)))
            {
                _core.BadChain(chain.Head, result == PopResult.Chain ? "receive chain has no room for the header" : "receive chain is malformed or outside RAM");
                if (first)
                {
                    if (!AddUsed(queue, memory, chain.Head, 0, ref used))
                        return DeliverResult.Broken;
                }
                else
                {
                    // Not among this frame's used entries: the driver reads a frame's
                    // num_buffers entries in a row. Returned after the frame.
                    _rxDeferredBad[_rxDeferredBadCount++] = chain.Head;
                }
                continue;
            }
            var writer = new ChainWriter(memory, chain);
            int chunk = (int)Math.Min((uint)(_rxLength - _rxOffset), chain.WritableLength);
            int written = writer.Write(_rxBuffer.AsSpan(_rxOffset, chunk));
            _rxUsed[_rxUsedCount++] = (chain.Head, (uint)written);
            if (written != chunk)
            {
                // RAM disappeared under a checked chain: the frame is lost.
                Interlocked.Increment(ref _rxDropped);
                for (int i = 0; i < _rxUsedCount; i++)
                    _rxUsed[i].Length = 0;
                _rxLength = 0;
                return FlushUsed(queue, memory, ref used) ? DeliverResult.Done : DeliverResult.Broken;
            }
            _rxOffset += written;
        }

        // §5.1.6.4: num_buffers in the first buffer's header, written before any used entry.
        ushort count = (ushort)_rxUsedCount;
        memory.TryWrite(_numBuffersLow, (byte)count);
        memory.TryWrite(_numBuffersHigh, (byte)(count >> 8));
        CountDelivered();
        _rxLength = 0;
        return FlushUsed(queue, memory, ref used) ? DeliverResult.Done : DeliverResult.Broken;
    }

    /// <summary>Records where bytes 10 and 11 of the writable part (num_buffers) are in guest
    /// memory: the header may straddle descriptors.</summary>
    private bool FindNumBuffers(DescriptorChain chain)
    {
        int found = 0;
        uint start = 0;
        foreach (ChainSegment s in chain.Writable)
        {
            for (uint wanted = NumBuffersOffset + (uint)found; found < 2 && wanted < start + s.Length; wanted++)
            {
                var address = new GuestAddress(s.Address.Value + (wanted - start));
                if (found++ == 0)
                    _numBuffersLow = address;
                else
                    _numBuffersHigh = address;
            }
            if (found == 2)
                return true;
            start += s.Length;
        }
        return false;
    }

    /// <summary>
    /// Returns the current frame's chains, then the bad ones met meanwhile, with one used.idx
    /// store (virtio 1.2 §2.7.8): published one by one, the driver could see the first buffer,
    /// whose num_buffers counts the rest (§5.1.6.4), before the rest are in the used ring, and
    /// Linux's receive_mergeable then drops the frame ("rx error: %d buffers out of %d missing").
    /// </summary>
    private bool FlushUsed(VirtQueue queue, GuestMemory memory, ref bool used)
    {
        bool ok = true;
        used |= _rxUsedCount + _rxDeferredBadCount != 0;
        for (int i = 0; i < _rxUsedCount && ok; i++)
            ok = queue.TryWriteUsed(memory, _rxUsed[i].Head, _rxUsed[i].Length);
        for (int i = 0; i < _rxDeferredBadCount && ok; i++)
            ok = queue.TryWriteUsed(memory, _rxDeferredBad[i], 0);
        _rxUsedCount = 0;
        _rxDeferredBadCount = 0;
        if (!ok || !queue.TryPublishUsed(memory))
        {
            _core.MarkBroken(_core.Interrupt, RxQueueIndex);
            return false;
        }
        return true;
    }

    private bool AddUsed(VirtQueue queue, GuestMemory memory, ushort head, uint length, ref bool used)
    {
        if (!queue.TryAddUsed(memory, head, length))
        {
            _core.MarkBroken(_core.Interrupt, RxQueueIndex);
            return false;
        }
        used = true;
        return true;
    }

    private void CountDelivered()
    {
        Interlocked.Increment(ref _rxFrames);
        Interlocked.Add(ref _rxBytes, _rxLength - HeaderSize);
    }
}
