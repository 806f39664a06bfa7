using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>
/// A virtio device model (blk, net, rng, …) as transports see it (firecracker VirtioDevice,
/// Cloud Hypervisor virtio-devices VirtioDevice). Transport-independent: the same device can sit
/// behind virtio-pci or virtio-mmio. Never sees a KVM fd: every queue kick reaches
/// <see cref="QueueNotify"/> on the VMM's I/O thread (the queue's eventfd, signalled by KVM's
/// ioeventfd or by the transport through <see cref="IVirtioQueueNotifier"/>).
/// </summary>
/// <remarks>
/// Config-space, <see cref="Activate"/> and <see cref="Reset"/> calls come from vCPU threads
/// under the transport's lock, so they must be short and must not wait for the device's worker.
/// <see cref="QueueNotify"/> comes from the I/O thread only, without the transport's lock, and
/// may race with <see cref="Reset"/>: a notification for a device that is not running is ignored.
/// </remarks>
public interface IVirtioDevice
{
    /// <summary>Device ID (<see cref="VirtioDeviceType"/>).</summary>
    uint DeviceType { get; }

    /// <summary>Features the device offers, including <see cref="VirtioFeatures.VERSION_1"/>.</summary>
    ulong DeviceFeatures { get; }

    /// <summary>Number of virtqueues.</summary>
    int QueueCount { get; }

    /// <summary>Maximum size of queue <paramref name="index"/> (a power of two up to 32768).</summary>
    ushort QueueMaxSize(int index);

    /// <summary>Reads device-specific configuration space (virtio 1.2 §5.x.4).
    /// Bytes beyond the device's configuration read as 0.</summary>
    void ReadConfig(ulong offset, Span<byte> data);

    /// <summary>Writes device-specific configuration space; writes to read-only fields are ignored.</summary>
    void WriteConfig(ulong offset, ReadOnlySpan<byte> data);

    /// <summary>
    /// Starts the device when the driver sets DRIVER_OK. <paramref name="queues"/> holds every
    /// queue; those with <see cref="VirtQueue.Ready"/> set have passed <see cref="VirtQueue.IsValid"/>.
    /// </summary>
    /// <returns>False when the device cannot start; the transport then sets DEVICE_NEEDS_RESET.</returns>
    bool Activate(GuestMemory memory, ulong negotiatedFeatures, IReadOnlyList<VirtQueue> queues, IVirtioInterrupt interrupt);

    /// <summary>The driver reset the device after <see cref="Activate"/>: stop touching the
    /// queues and guest memory before returning, and forget the negotiated state.</summary>
    void Reset();

    /// <summary>
    /// True after the device stopped on a ring no honest driver produces (virtio 1.2 §2.1.2);
    /// cleared by <see cref="Reset"/>. While it is set the transport shows DEVICE_NEEDS_RESET in
    /// the device status; the device signals <see cref="VirtioInterruptType.Config"/> when it sets
    /// it, as §2.1.2 requires once DRIVER_OK is set.
    /// </summary>
    bool Broken => false;

    /// <summary>The driver notified queue <paramref name="queueIndex"/> (virtio 1.2 §2.9). Called
    /// on the VMM's I/O thread, which also serves the network and the console: must not block, so
    /// a device whose work can (disk I/O, fsync) hands it to its own worker.</summary>
    /// <returns>True when a budget ran out with work left that no new kick will announce: the
    /// caller calls again after its other ready events.</returns>
    bool QueueNotify(int queueIndex);
}
