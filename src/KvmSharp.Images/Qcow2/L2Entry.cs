namespace KvmSharp.Images.Qcow2;

/// <summary>
/// The standard (first) 64 bits of an L2 table entry, qcow2.txt "Cluster mapping" / "Standard Cluster
/// Descriptor" / "Compressed Clusters Descriptor", with named predicates instead of masks at every use.
/// </summary>
internal readonly record struct L2Entry(ulong Raw)
{
    /// <summary>Bit 62: the cluster is compressed (the rest is a compressed cluster descriptor).</summary>
    public bool IsCompressed => (Raw & Qcow2Const.CompressedFlag) != 0;

    /// <summary>Bit 63: refcount is exactly one, the cluster may be written in place.</summary>
    public bool IsCopied => (Raw & Qcow2Const.CopiedFlag) != 0;

    /// <summary>Bit 0 of a standard descriptor: reads as zeros. Only meaningful in version 3 images without
    /// extended L2 entries; "with version 2 or with extended L2 entries, this is always 0".</summary>
    public bool ZeroFlag => !IsCompressed && (Raw & Qcow2Const.ZeroFlag) != 0;

    /// <summary>Bits 9-55 of a standard descriptor: host cluster offset, 0 when unallocated.</summary>
    public ulong HostOffset => IsCompressed ? 0 : Raw & Qcow2Const.OffsetMask;
}
