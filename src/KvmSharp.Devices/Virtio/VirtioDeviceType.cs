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
