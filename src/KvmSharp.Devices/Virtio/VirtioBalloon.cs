using System.Buffers.Binary;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>Feature bits of the traditional memory balloon (virtio 1.2 §5.5.3).</summary>
public static class VirtioBalloonFeatures
{
    public const ulong MUST_TELL_HOST = 1UL << 0;
    public const ulong STATS_VQ = 1UL << 1;
    public const ulong DEFLATE_ON_OOM = 1UL << 2;
    public const ulong FREE_PAGE_HINT = 1UL << 3;
    public const ulong PAGE_POISON = 1UL << 4;
    public const ulong PAGE_REPORTING = 1UL << 5;
}

/// <summary>Memory statistics tags (virtio 1.2 §5.5.6.3).</summary>
public static class VirtioBalloonStatTag
{
    public const ushort SWAP_IN = 0;
    public const ushort SWAP_OUT = 1;
    public const ushort MAJFLT = 2;
    public const ushort MINFLT = 3;
    public const ushort MEMFREE = 4;
    public const ushort MEMTOT = 5;
    public const ushort AVAIL = 6;
    public const ushort CACHES = 7;
    public const ushort HTLB_PGALLOC = 8;
    public const ushort HTLB_PGFAIL = 9;
}

/// <summary>One guest memory statistic: a <see cref="VirtioBalloonStatTag"/> and its value (bytes
/// for the memory sizes, counts for the others).</summary>
public readonly record struct VirtioBalloonStat(ushort Tag, ulong Value);

/// <summary>
/// Traditional memory balloon (virtio 1.2 §5.5): the host asks for a target size with
/// <see cref="SetTargetPages"/>; the driver inflates (gives 4 KiB pages back: the device discards
/// them from guest RAM with <see cref="GuestMemory.TryDiscard"/>) or deflates (takes pages back:
/// nothing to do, they fault back in as zeros) and reports its size in <c>actual</c>.
/// With VIRTIO_BALLOON_F_STATS_VQ the driver also reports memory statistics on demand
/// (<see cref="RequestStats"/>, <see cref="Stats"/>).
/// </summary>
/// <remarks>
/// <para>Guest-supplied page frame numbers are checked against guest RAM; bad ones are ignored
/// and counted (<see cref="InvalidPfns"/>). Runs of consecutive PFNs become one discard call.</para>
/// <para>MUST_TELL_HOST is not offered, so the driver may reuse deflated pages at once; nothing
/// the device does depends on a deflate arriving.</para>
/// <para>Threads: queue kicks (I/O thread), <see cref="SetTargetPages"/> and
/// <see cref="RequestStats"/> (API thread), config access, <see cref="Activate"/> and
/// <see cref="Reset"/> (vCPU threads) serialise on one lock; interrupts are signalled under it.</para>
/// </remarks>
public sealed class VirtioBalloon : IVirtioDevice
{
    /// <summary>Page size of balloon PFNs, always 4 KiB (VIRTIO_BALLOON_PFN_SHIFT 12).</summary>
    public const int PageSize = 4096;

    /// <summary>Most statistics kept from one stats buffer (the spec defines 10 tags).</summary>
    public const int MaxStats = 32;

    private const int InflateQueue = 0;
    private const int DeflateQueue = 1;
    private const int StatsQueue = 2;
    private const int ConfigSize = 16; // num_pages, actual, free_page_hint_cmd_id, poison_val (§5.5.4)
    private const int StatSize = 10;   // struct virtio_balloon_stat: le16 tag, le64 val, packed
    private const int PageShift = 12;

    private readonly ushort _queueSize;
    private readonly bool _deflateOnOom;

    // Guards everything below.
    private readonly Lock _lock = new();
    private readonly DescriptorChain _chain;
    private readonly VirtioDeviceCore _core;
    private readonly ChainHandler _inflate, _deflate;
    private readonly uint[] _pfns = new uint[256];
    private readonly VirtioBalloonStat[] _stats = new VirtioBalloonStat[MaxStats];
    private int _statsCount;
    private long _statsUpdates;
    private bool _statsHeld;
    private ushort _statsHead;
    private uint _targetPages;
    private uint _actualPages;
    private bool _statsNegotiated;

    private long _inflatedPages;
    private long _deflatedPages;
    private long _invalidPfns;
    private long _discardFailures;

    /// <summary>Creates the balloon, initially empty (target 0 pages).</summary>
    /// <param name="queueSize">Maximum size of each queue (a power of two up to 32768).</param>
    /// <param name="deflateOnOom">Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages
    /// back under memory pressure instead of going out of memory.</param>
    /// <param name="log">Where guest-caused errors are reported, rate-limited; null for none.</param>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="queueSize"/> is invalid.</exception>
    public VirtioBalloon(ushort queueSize = 128, bool deflateOnOom = true, RateLimitedLog? log = null)
    {
        VirtQueue.ValidateMaxSize(queueSize);
        _queueSize = queueSize;
        _deflateOnOom = deflateOnOom;
        _chain = new DescriptorChain(queueSize);
        _core = new VirtioDeviceCore("virtio-balloon", QueueCount, log);
        _inflate = Inflate;
        _deflate = Deflate;
    }

    /// <inheritdoc/>
    public uint DeviceType => VirtioDeviceType.Balloon;

    /// <inheritdoc/>
    public ulong DeviceFeatures => VirtioFeatures.VERSION_1 | VirtioFeatures.RING_INDIRECT_DESC | VirtioFeatures.RING_EVENT_IDX
        | VirtioBalloonFeatures.STATS_VQ | (_deflateOnOom ? VirtioBalloonFeatures.DEFLATE_ON_OOM : 0);

    /// <inheritdoc/>
    /// <remarks>inflateq, deflateq, statsq (§5.5.2); the driver leaves statsq unused without STATS_VQ.</remarks>
    public int QueueCount => 3;

    /// <summary>The size the host asked for, in 4 KiB pages (config num_pages).</summary>
    public uint TargetPages
    {
        get
        {
            lock (_lock)
                return _targetPages;
        }
    }

    /// <summary>The balloon size the driver last reported, in 4 KiB pages (config actual).</summary>
    public uint ActualPages
    {
        get
        {
            lock (_lock)
                return _actualPages;
        }
    }

    /// <summary>Pages discarded on inflation since creation (a page inflated twice counts twice).</summary>
    public long InflatedPages => Interlocked.Read(ref _inflatedPages);

    /// <summary>PFNs received on the deflate queue since creation.</summary>
    public long DeflatedPages => Interlocked.Read(ref _deflatedPages);

    /// <summary>Inflate PFNs that were not guest RAM (ignored).</summary>
    public long InvalidPfns => Interlocked.Read(ref _invalidPfns);

    /// <summary>Discard calls the host refused (e.g. on huge pages); the pages stay populated.</summary>
    public long DiscardFailures => Interlocked.Read(ref _discardFailures);

    /// <summary>Malformed chains returned with length 0.</summary>
    public long BadChains => _core.BadChains;

    /// <summary>Stats buffers received since creation.</summary>
    public long StatsUpdates => Interlocked.Read(ref _statsUpdates);

    /// <summary>True after the driver corrupted a ring; cleared by reset.</summary>
    public bool Broken => _core.Broken;

    /// <summary>The statistics of the last stats buffer, in the driver's order (a copy).</summary>
    public IReadOnlyList<VirtioBalloonStat> Stats
    {
        get
        {
            lock (_lock)
                return _stats.AsSpan(0, _statsCount).ToArray();
        }
    }

    /// <summary>Looks up one statistic of the last stats buffer.</summary>
    public bool TryGetStat(ushort tag, out ulong value)
    {
        lock (_lock)
        {
            foreach (VirtioBalloonStat s in _stats.AsSpan(0, _statsCount))
            {
                if (s.Tag == tag)
                {
                    value = s.Value;
                    return true;
                }
            }
        }
        value = 0;
        return false;
    }

    /// <inheritdoc/>
    public ushort QueueMaxSize(int index) => _queueSize;

    /// <summary>
    /// Asks the guest to grow or shrink the balloon to <paramref name="pages"/> 4 KiB pages:
    /// updates num_pages and, when the driver is running, sends a configuration change interrupt
    /// (§5.5.6). Thread-safe.
    /// </summary>
    public void SetTargetPages(uint pages)
    {
        lock (_lock)
        {
            if (_targetPages == pages)
                return;
            _targetPages = pages;
            _core.Interrupt?.Signal(VirtioInterruptType.Config, 0);
        }
    }

    /// <summary>
    /// Asks the driver for fresh statistics by returning the stats buffer it left with the device
    /// (§5.5.6.3); the driver refills and re-posts it, and <see cref="Stats"/> changes when the
    /// device processes it (<see cref="StatsUpdates"/> increments). Thread-safe.
    /// </summary>
    /// <returns>False when no stats buffer is held (driver not running, STATS_VQ not negotiated,
    /// or a request already outstanding).</returns>
    public bool RequestStats()
    {
        lock (_lock)
        {
            if (!_statsHeld || !_core.TryGetQueue(StatsQueue, out VirtQueue? queue, out GuestMemory? memory, out IVirtioInterrupt? interrupt))
                return false;
            _statsHeld = false;
            if (!queue.TryAddUsed(memory, _statsHead, 0))
            {
                _core.MarkBroken(interrupt, StatsQueue);
                return false;
            }
            if (queue.NeedsNotification(memory))
                interrupt.Signal(VirtioInterruptType.Queue, StatsQueue);
            return true;
        }
    }

    /// <inheritdoc/>
    /// <remarks>struct virtio_balloon_config (§5.5.4): num_pages, actual; hint and poison fields read 0.</remarks>
    public void ReadConfig(ulong offset, Span<byte> data)
    {
        Span<byte> config = stackalloc byte[ConfigSize];
        config.Clear();
        lock (_lock)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(config, _targetPages);
            BinaryPrimitives.WriteUInt32LittleEndian(config[4..], _actualPages);
        }
        VirtioConfigSpace.Read(config, offset, data);
    }

    /// <inheritdoc/>
    /// <remarks>Only actual (offset 4, 4 bytes) is writable by the driver; partial writes update
    /// the bytes they cover.</remarks>
    public void WriteConfig(ulong offset, ReadOnlySpan<byte> data)
    {
        if (offset >= 8 || data.IsEmpty)
            return;
        lock (_lock)
        {
            Span<byte> actual = stackalloc byte[4];
            BinaryPrimitives.WriteUInt32LittleEndian(actual, _actualPages);
            for (int i = 0; i < data.Length; i++)
            {
                ulong at = offset + (ulong)i;
                if (at is >= 4 and < 8)
                    actual[(int)(at - 4)] = data[i];
            }
            _actualPages = BinaryPrimitives.ReadUInt32LittleEndian(actual);
        }
    }

    /// <inheritdoc/>
    public bool Activate(GuestMemory memory, ulong negotiatedFeatures, IReadOnlyList<VirtQueue> queues, IVirtioInterrupt interrupt)
    {
        bool stats = (negotiatedFeatures & VirtioBalloonFeatures.STATS_VQ) != 0;
        lock (_lock)
        {
            // Inflate and deflate are the device's function; statsq only with STATS_VQ.
            if (!_core.Activate(memory, negotiatedFeatures, queues, interrupt, requiredQueues: 2))
                return false;
            _statsNegotiated = stats && queues[StatsQueue].Ready;
            _statsHeld = false;
        }
        return true;
    }

    /// <inheritdoc/>
    /// <remarks>The target stays; actual goes back to 0 (a new driver starts with an empty balloon).</remarks>
    public void Reset()
    {
        lock (_lock)
        {
            _core.Reset();
            _statsNegotiated = false;
            _statsHeld = false;
            _actualPages = 0;
        }
    }

    /// <inheritdoc/>
    public bool QueueNotify(int queueIndex)
    {
        lock (_lock)
        {
            switch (queueIndex)
            {
                case InflateQueue:
                    _core.Serve(InflateQueue, _chain, _inflate);
                    break;
                case DeflateQueue:
                    _core.Serve(DeflateQueue, _chain, _deflate);
                    break;
                case StatsQueue when _statsNegotiated && _core.TryGetQueue(StatsQueue, out VirtQueue? queue, out GuestMemory? memory, out IVirtioInterrupt? interrupt):
                    ProcessStats(memory, queue, interrupt);
                    break;
                default:
                    break;
            }
        }
        return false;
    }

    /// <remarks>§5.5.6: the device writes nothing into inflate or deflate buffers.</remarks>
    private uint Deflate(GuestMemory memory, DescriptorChain chain)
    {
        Interlocked.Add(ref _deflatedPages, chain.ReadableLength / sizeof(uint));
        return 0;
    }

    /// <summary>Discards the pages whose PFNs the chain lists (le32 each, §5.5.6.1).</summary>
    private uint Inflate(GuestMemory memory, DescriptorChain chain)
    {
        var reader = new ChainReader(memory, chain);
        ulong runStart = 0, runPages = 0;
        while (reader.Remaining >= sizeof(uint))
        {
            int count = (int)Math.Min((uint)_pfns.Length, reader.Remaining / sizeof(uint));
            Span<byte> bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(_pfns.AsSpan(0, count));
            if (reader.Read(bytes) != bytes.Length)
                break;
            for (int i = 0; i < count; i++)
            {
                ulong pfn = BinaryPrimitives.ReadUInt32LittleEndian(bytes[(i * sizeof(uint))..]);
                if (!memory.IsValidRange(new GuestAddress(pfn << PageShift), PageSize))
                {
                    Interlocked.Increment(ref _invalidPfns);
                    continue;
                }
                if (runPages != 0 && pfn == runStart + runPages)
                {
                    runPages++;
                    continue;
                }
                Discard(memory, runStart, runPages);
                runStart = pfn;
                runPages = 1;
            }
        }
        Discard(memory, runStart, runPages);
        if (reader.Remaining != 0)
            _core.Log?.Write("virtio-balloon: inflate buffer length not a multiple of 4, head ", chain.Head);
        return 0;
    }

    private void Discard(GuestMemory memory, ulong startPfn, ulong pages)
    {
        if (pages == 0)
            return;
        if (memory.TryDiscard(new GuestAddress(startPfn << PageShift), pages << PageShift))
        {
            Interlocked.Add(ref _inflatedPages, (long)pages);
        }
        else
        {
            Interlocked.Increment(ref _discardFailures);
            _core.Log?.Write("virtio-balloon: discard failed at pfn ", startPfn);
        }
    }

    /// <summary>Parses the driver's stats buffer and keeps it until the host wants new stats.</summary>
    private void ProcessStats(GuestMemory memory, VirtQueue queue, IVirtioInterrupt interrupt)
    {
        while (true)
        {
            PopResult result;
            while ((result = queue.TryPop(memory, _chain)) != PopResult.Empty)
            {
                if (result == PopResult.BrokenRing)
                {
                    _core.MarkBroken(interrupt, StatsQueue);
                    return;
                }
                if (_statsHeld)
                {
                    // An honest driver has one stats buffer; give an older one back rather than leak it.
                    if (!queue.TryAddUsed(memory, _statsHead, 0))
                    {
                        _core.MarkBroken(interrupt, StatsQueue);
                        return;
                    }
                    _statsHeld = false;
                    if (queue.NeedsNotification(memory))
                        interrupt.Signal(VirtioInterruptType.Queue, StatsQueue);
                }
                if (result == PopResult.Chain)
                {
                    ParseStats(memory);
                }
                else
                {
                    _core.BadChain(_chain.Head);
                }
                _statsHead = _chain.Head;
                _statsHeld = true;
            }
            if (!queue.EnableNotification(memory))
                break;
        }
    }

    private void ParseStats(GuestMemory memory)
    {
        var reader = new ChainReader(memory, _chain);
        Span<byte> entry = stackalloc byte[StatSize];
        int count = 0;
        while (count < MaxStats && reader.Remaining >= StatSize && reader.Read(entry) == StatSize)
        {
            _stats[count++] = new VirtioBalloonStat(
                BinaryPrimitives.ReadUInt16LittleEndian(entry),
                BinaryPrimitives.ReadUInt64LittleEndian(entry[2..]));
        }
        _statsCount = count;
        Interlocked.Increment(ref _statsUpdates);
    }
}
