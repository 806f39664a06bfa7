namespace KvmSharp.Devices.Virtio;

/// <summary>
/// The per-queue registers virtio-pci (common configuration, virtio 1.2 §4.1.4.3) and virtio-mmio
/// (§4.2.2) both have, decoded once by <see cref="VirtioTransportCore"/>; the 64-bit addresses are
/// written as two 32-bit halves (§4.1.3.1).
/// </summary>
internal enum VirtioQueueRegister
{
    /// <summary>queue_size / QueueNum.</summary>
    Size,

    /// <summary>queue_desc / QueueDescLow.</summary>
    DescLow,

    /// <summary>queue_desc + 4 / QueueDescHigh.</summary>
    DescHigh,

    /// <summary>queue_driver / QueueDriverLow.</summary>
    DriverLow,

    /// <summary>queue_driver + 4 / QueueDriverHigh.</summary>
    DriverHigh,

    /// <summary>queue_device / QueueDeviceLow.</summary>
    DeviceLow,

    /// <summary>queue_device + 4 / QueueDeviceHigh.</summary>
    DeviceHigh,
}
