using System.Buffers.Binary;
using KvmSharp.Interop;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

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
public sealed partial class VirtioNet : IVirtioDevice
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
}
