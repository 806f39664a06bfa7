namespace KvmSharp.Devices.Virtio;

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
