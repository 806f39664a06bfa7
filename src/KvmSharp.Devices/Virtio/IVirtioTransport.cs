namespace KvmSharp.Devices.Virtio;

/// <summary>What the VMM's queue events need of a transport (virtio-pci or virtio-mmio).</summary>
public interface IVirtioTransport
{
    /// <summary>The queues, for tests and snapshots.</summary>
    IReadOnlyList<VirtQueue> Queues { get; }

    /// <summary>
    /// Queue <paramref name="queueIndex"/> was kicked (its eventfd fired). Call on the I/O thread;
    /// ignored before DRIVER_OK or for a queue that does not exist.
    /// </summary>
    /// <returns>True when the device has work left that no new kick will announce (see
    /// <see cref="IVirtioDevice.QueueNotify"/>).</returns>
    bool NotifyQueue(int queueIndex);
}
