namespace KvmSharp.Devices.Virtio;

/// <summary>What a device tells the driver through <see cref="IVirtioInterrupt.Signal"/>.</summary>
public enum VirtioInterruptType
{
    /// <summary>The device added buffers to a queue's used ring.</summary>
    Queue,

    /// <summary>The device configuration space changed (or DEVICE_NEEDS_RESET was set).</summary>
    Config,
}
