namespace KvmSharp.Devices.Virtio;

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
