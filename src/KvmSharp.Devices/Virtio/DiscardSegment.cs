using System.Runtime.InteropServices;

namespace KvmSharp.Devices.Virtio;

/// <summary>struct virtio_blk_discard_write_zeroes (virtio 1.2 §5.2.6), as the driver wrote it:
/// sector, num_sectors, flags.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct DiscardSegment
{
    public ulong Sector;
    public uint NumSectors;
    public uint Flags;
}
