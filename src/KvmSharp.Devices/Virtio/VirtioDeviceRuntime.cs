using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>Serves one valid chain popped from a queue.</summary>
/// <returns>Bytes the device wrote into the chain: the used length (virtio 1.2 §2.7.8).</returns>
internal delegate uint ChainHandler(GuestMemory memory, DescriptorChain chain);

/// <summary>
/// What the virtio device models share at run time: the count of malformed chains, the broken
/// state (DEVICE_NEEDS_RESET, virtio 1.2 §2.1.2) and the pop / serve / return loop of a queue.
/// One per device; it takes no lock, so each device calls it under whichever of its own locks
/// guards the queue in hand.
/// </summary>
internal sealed class VirtioDeviceRuntime(string device, RateLimitedLog? log)
{
    private long _badChains;
    private int _broken;

    /// <summary>Malformed chains (and requests a device refused as malformed) since creation.</summary>
    public long BadChains => Interlocked.Read(ref _badChains);

    /// <summary>True after the driver made a ring impossible; cleared by <see cref="ClearBroken"/>.</summary>
    public bool Broken => Volatile.Read(ref _broken) != 0;

    /// <summary>Called at activation and reset.</summary>
    public void ClearBroken() => Volatile.Write(ref _broken, 0);

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
