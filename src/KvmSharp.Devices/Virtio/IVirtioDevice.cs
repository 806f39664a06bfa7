using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>Device IDs (virtio 1.2 §5, "Device Types").</summary>
public static class VirtioDeviceType
{
    public const uint Net = 1;
    public const uint Block = 2;
    public const uint Console = 3;
    public const uint Entropy = 4;
    public const uint Balloon = 5;
    public const uint Vsock = 19;
}

/// <summary>Device-independent feature bits (virtio 1.2 §6, "Reserved Feature Bits").</summary>
public static class VirtioFeatures
{
    public const ulong RING_INDIRECT_DESC = 1UL << 28;
    public const ulong RING_EVENT_IDX = 1UL << 29;
    public const ulong VERSION_1 = 1UL << 32;
    public const ulong ACCESS_PLATFORM = 1UL << 33;
    public const ulong RING_PACKED = 1UL << 34;
    public const ulong IN_ORDER = 1UL << 35;
    public const ulong ORDER_PLATFORM = 1UL << 36;
    public const ulong SR_IOV = 1UL << 37;
    public const ulong NOTIFICATION_DATA = 1UL << 38;
    public const ulong RING_RESET = 1UL << 40;
}

/// <summary>Device status bits (virtio 1.2 §2.1).</summary>
public static class VirtioDeviceStatus
{
    public const byte ACKNOWLEDGE = 1;
    public const byte DRIVER = 2;
    public const byte DRIVER_OK = 4;
    public const byte FEATURES_OK = 8;
    public const byte DEVICE_NEEDS_RESET = 64;
    public const byte FAILED = 128;
}

/// <summary>What a device tells the driver through <see cref="IVirtioInterrupt.Signal"/>.</summary>
public enum VirtioInterruptType
{
    /// <summary>The device added buffers to a queue's used ring.</summary>
    Queue,

    /// <summary>The device configuration space changed (or DEVICE_NEEDS_RESET was set).</summary>
    Config,
}

/// <summary>
/// The interrupt path from a device to its driver, supplied by the transport: an INTx-style line
/// with an interrupt status register (virtio-mmio) or per-queue MSI-X vectors (virtio-pci).
/// Thread-safe; called from the device's worker thread.
/// </summary>
/// <remarks>Takes no lock that a transport holds while calling into its device, so a device may
/// signal while holding its own lock.</remarks>
public interface IVirtioInterrupt
{
    /// <summary>Interrupts the driver. <paramref name="queueIndex"/> is ignored for
    /// <see cref="VirtioInterruptType.Config"/>.</summary>
    void Signal(VirtioInterruptType type, int queueIndex);
}

/// <summary>
/// A virtio device model (blk, net, rng, …) as transports see it (firecracker VirtioDevice,
/// Cloud Hypervisor virtio-devices VirtioDevice). Transport-independent: the same device can sit
/// behind virtio-pci or virtio-mmio. Never sees a KVM fd: queue kicks arrive through
/// <see cref="QueueNotify"/> or, when the VMM registered an ioeventfd, through the VMM's event loop.
/// </summary>
/// <remarks>
/// Config-space, <see cref="Activate"/> and <see cref="Reset"/> calls come from vCPU threads
/// under the transport's lock, so they must be short and must not wait for the device's worker.
/// <see cref="QueueNotify"/> comes without the transport's lock and may race with
/// <see cref="Reset"/>: a notification for a device that is not running is ignored. Queue
/// processing belongs on the I/O thread.
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

    /// <summary>The driver notified queue <paramref name="queueIndex"/> through the transport's
    /// notify register (no ioeventfd was registered). Must not block: wake the worker.</summary>
    void QueueNotify(int queueIndex);
}
