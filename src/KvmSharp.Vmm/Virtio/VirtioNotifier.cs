using KvmSharp.Devices.Pci;
using KvmSharp.Devices.Virtio;

namespace KvmSharp.Vmm.Virtio;

/// <summary>
/// Keeps each virtio-pci device's queue ioeventfds on its notify region wherever the guest maps
/// BAR 0 (design.md: "notifications arrive through ioeventfd"). Only BAR moves come here (vCPU
/// threads, rare); kicks go straight from the queue's eventfd to its handler.
/// </summary>
internal sealed class VirtioNotifier : IPciBarObserver
{
    // Linux's virtio-pci driver writes the queue index as 16 bits (virtio 1.2 §4.1.5.2).
    private const uint NotifyWidth = 2;

    private readonly Lock _lock = new();
    private readonly Dictionary<VirtioPciTransport, VirtioQueueEvents> _events = [];

    /// <summary>Follows <paramref name="transport"/>'s BAR 0 with <paramref name="events"/>; call before adding it to the root.</summary>
    public void Track(VirtioPciTransport transport, VirtioQueueEvents events)
    {
        lock (_lock)
            _events[transport] = events;
    }

    public void BarMapped(IPciDevice device, PciBar bar, ulong address)
    {
        if (Find(device, bar) is { } events)
            events.AssignIoeventfds(address + VirtioPciTransport.NotifyOffset, VirtioPciTransport.NotifyOffMultiplier, NotifyWidth, matchQueueIndex: false);
    }

    public void BarUnmapped(IPciDevice device, PciBar bar, ulong address)
    {
        Find(device, bar)?.DeassignIoeventfds();
    }

    private VirtioQueueEvents? Find(IPciDevice device, PciBar bar)
    {
        if (device is not VirtioPciTransport transport || bar.Index != 0)
            return null;
        lock (_lock)
            return _events.GetValueOrDefault(transport);
    }
}
