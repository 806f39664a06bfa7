namespace KvmSharp.Devices.Virtio;

/// <summary>Device-specific feature bits of virtio-net (virtio 1.2 §5.1.3).</summary>
public static class VirtioNetFeatures
{
    public const ulong CSUM = 1UL << 0;
    public const ulong GUEST_CSUM = 1UL << 1;
    public const ulong CTRL_GUEST_OFFLOADS = 1UL << 2;
    public const ulong MTU = 1UL << 3;
    public const ulong MAC = 1UL << 5;
    public const ulong GUEST_TSO4 = 1UL << 7;
    public const ulong GUEST_TSO6 = 1UL << 8;
    public const ulong GUEST_ECN = 1UL << 9;
    public const ulong GUEST_UFO = 1UL << 10;
    public const ulong HOST_TSO4 = 1UL << 11;
    public const ulong HOST_TSO6 = 1UL << 12;
    public const ulong HOST_ECN = 1UL << 13;
    public const ulong HOST_UFO = 1UL << 14;
    public const ulong MRG_RXBUF = 1UL << 15;
    public const ulong STATUS = 1UL << 16;
    public const ulong CTRL_VQ = 1UL << 17;
}
