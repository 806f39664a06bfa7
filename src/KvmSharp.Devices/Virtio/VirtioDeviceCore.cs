using System.Diagnostics.CodeAnalysis;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>Serves one valid chain popped from a queue.</summary>
/// <returns>Bytes the device wrote into the chain: the used length (virtio 1.2 §2.7.8).</returns>
internal delegate uint ChainHandler(GuestMemory memory, DescriptorChain chain);

/// <summary>
/// What the five virtio device models share (Cloud Hypervisor's <c>VirtioCommon</c>,
/// Firecracker's <c>DeviceState</c>): the activated state (guest memory, queues, interrupt,
/// negotiated features), the broken state (DEVICE_NEEDS_RESET, virtio 1.2 §2.1.2), the count and
/// rate-limited log of malformed chains, the activate / reset skeleton, the "is it running?" guard
/// and the pop / serve / return loop of a queue. A device adds its configuration and its handlers.
/// </summary>
/// <remarks>Takes no lock: each device calls it under its own lock(s). <see cref="Activate"/> and
/// <see cref="Reset"/> run under all of a device's locks, so any one of them suffices for the
/// rest, and reset races are the same for every device.</remarks>
internal sealed class VirtioDeviceCore(string device, int queueCount, RateLimitedLog? log)
{
    private long _badChains;
    private int _broken;

    /// <summary>Where guest-caused errors go, rate-limited; null for none.</summary>
    public RateLimitedLog? Log => log;

    /// <summary>Guest memory while the device runs; null before activation and after reset.</summary>
    public GuestMemory? Memory { get; private set; }

    /// <summary>The interrupt while the device runs.</summary>
    public IVirtioInterrupt? Interrupt { get; private set; }

    /// <summary>The queues while the device runs.</summary>
    public IReadOnlyList<VirtQueue>? Queues { get; private set; }

    /// <summary>The features the driver accepted (0 while not running).</summary>
    public ulong Features { get; private set; }

    /// <summary>Checks and records an activation (<see cref="IVirtioDevice.Activate"/>): every
    /// queue is there and the first <paramref name="requiredQueues"/> are ready, since without
    /// them the device has no function; the broken state is cleared.</summary>
    /// <returns>False when the device cannot start (nothing recorded).</returns>
    public bool Activate(GuestMemory memory, ulong features, IReadOnlyList<VirtQueue> queues, IVirtioInterrupt interrupt, int requiredQueues)
    {
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(queues);
        ArgumentNullException.ThrowIfNull(interrupt);
        if (queues.Count != queueCount)
            return false;
        for (int i = 0; i < requiredQueues; i++)
        {
            if (!queues[i].Ready)
                return false;
        }
        Memory = memory;
        Interrupt = interrupt;
        Queues = queues;
        Features = features;
        Volatile.Write(ref _broken, 0);
        return true;
    }

    /// <summary>Forgets the activation (<see cref="IVirtioDevice.Reset"/>): from here on the guard
    /// refuses, so no handler touches guest memory again.</summary>
    public void Reset()
    {
        Memory = null;
        Interrupt = null;
        Queues = null;
        Features = 0;
        Volatile.Write(ref _broken, 0);
    }

    /// <summary>
    /// The "is it running?" guard: true, with what serving queue <paramref name="index"/> needs,
    /// when the device is activated, not broken, and that queue exists and is ready.
    /// </summary>
    public bool TryGetQueue(int index, [NotNullWhen(true)] out VirtQueue? queue, [NotNullWhen(true)] out GuestMemory? memory,
        [NotNullWhen(true)] out IVirtioInterrupt? interrupt)
    {
        queue = null;
        memory = Memory;
        interrupt = Interrupt;
        if (memory is null || interrupt is null || Queues is not { } queues || Broken
            || (uint)index >= (uint)queues.Count || !queues[index].Ready)
        {
            memory = null;
            interrupt = null;
            return false;
        }
        queue = queues[index];
        return true;
    }

    /// <summary>Serves queue <paramref name="index"/> with <paramref name="handler"/> if the device
    /// runs (<see cref="TryGetQueue"/>, then <see cref="Drain"/>).</summary>
    public void Serve(int index, DescriptorChain chain, ChainHandler handler)
    {
        if (TryGetQueue(index, out VirtQueue? queue, out GuestMemory? memory, out IVirtioInterrupt? interrupt))
            Drain(queue, index, memory, interrupt, chain, handler);
    }

    /// <summary>Malformed chains (and requests a device refused as malformed) since creation.</summary>
    public long BadChains => Interlocked.Read(ref _badChains);

    /// <summary>True after the driver made a ring impossible; cleared by activation and reset.</summary>
    public bool Broken => Volatile.Read(ref _broken) != 0;

    /// <summary>Counts and logs (rate-limited) a chain returned unused.</summary>
    public void BadChain(ushort head, string what = "malformed descriptor chain")
    {
        Interlocked.Increment(ref _badChains);
        log?.Write($"{device}: {what} (head {head}), returned unused");
    }

    /// <summary>
    /// Stops the device until reset and tells the driver: the flag goes up first, so the
    /// transport already shows DEVICE_NEEDS_RESET when the configuration change interrupt that
    /// §2.1.2 requires arrives.
    /// </summary>
    public void MarkBroken(IVirtioInterrupt? interrupt, int queueIndex)
    {
        Volatile.Write(ref _broken, 1);
        log?.Write($"{device}: impossible ring state on queue {queueIndex}, device stopped until reset");
        interrupt?.Signal(VirtioInterruptType.Config, 0);
    }

    /// <summary>
    /// Pops every available chain of <paramref name="queue"/> into <paramref name="chain"/>, runs
    /// <paramref name="handler"/> on each valid one and returns each through the used ring,
    /// malformed ones with length 0 (§2.7.13 from the device side). When the ring is empty it asks
    /// for the next kick and looks once more, since buffers added meanwhile may never be kicked
    /// (§2.7.10); then interrupts the driver if it wants it. An impossible ring marks the device
    /// broken (<see cref="MarkBroken"/>).
    /// </summary>
    public void Drain(VirtQueue queue, int queueIndex, GuestMemory memory, IVirtioInterrupt interrupt, DescriptorChain chain, ChainHandler handler)
    {
        bool used = false;
        bool broken = false;
        while (!broken)
        {
            PopResult result;
            while ((result = queue.TryPop(memory, chain)) != PopResult.Empty)
            {
                if (result == PopResult.BrokenRing)
                {
                    broken = true;
                    break;
                }
                uint written = 0;
                if (result == PopResult.Chain)
                    written = handler(memory, chain);
                else
                    BadChain(chain.Head);
                if (!queue.TryAddUsed(memory, chain.Head, written))
                {
                    broken = true;
                    break;
                }
                used = true;
            }
            if (broken || !queue.EnableNotification(memory))
                break;
        }
        if (used && queue.NeedsNotification(memory))
            interrupt.Signal(VirtioInterruptType.Queue, queueIndex);
        if (broken)
            MarkBroken(interrupt, queueIndex);
    }
}
