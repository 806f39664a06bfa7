namespace KvmSharp.Images;

/// <summary>What one layer of an image says about a range of the virtual disk (qemu's block status).</summary>
public enum BlockState : byte
{
    /// <summary>This layer does not define the range: reads go to the backing file, or read zeros without one.</summary>
    Unallocated,

    /// <summary>The range reads as zeros, recorded in this layer (qcow2 zero flag or zero subclusters).</summary>
    Zero,

    /// <summary>This layer stores data for the range.</summary>
    Data,
}

/// <summary>
/// An answer of <see cref="IBlockDevice.GetBlockStatus"/>: from the asked offset, <see cref="Length"/> bytes
/// (at least 1) are in <see cref="State"/>; for data stored uncompressed (and preallocated zeros),
/// <see cref="HostOffset"/> is where the first byte lies in the image file, and the range is contiguous there.
/// </summary>
public readonly record struct BlockExtent(BlockState State, ulong Length, ulong HostOffset = BlockExtent.NoOffset)
{
    /// <summary>No host offset: compressed data, unallocated or plain zero ranges.</summary>
    public const ulong NoOffset = ulong.MaxValue;

    public bool HasOffset => HostOffset != NoOffset;
}
