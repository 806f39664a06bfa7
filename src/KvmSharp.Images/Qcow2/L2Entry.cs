using System.Buffers.Binary;

namespace KvmSharp.Images.Qcow2;

/// <summary>
/// One L2 table entry, qcow2.txt "Cluster mapping": the 64-bit cluster descriptor ("Standard Cluster
/// Descriptor" or "Compressed Clusters Descriptor") and, with extended L2 entries, the 64-bit
/// "Subcluster allocation bitmap" after it ("Extended L2 Entries"; 0 otherwise). Named predicates
/// instead of masks at every use.
/// </summary>
internal readonly record struct L2Entry(ulong Raw, ulong SubclusterBitmap = 0)
{
    /// <summary>qcow2.txt "Extended L2 Entries": every cluster has 32 subclusters.</summary>
    public const int SubclustersPerCluster = 32;

    /// <summary>Bitmap bits 0-31: "subcluster x is allocated", all of them.</summary>
    public const ulong AllSubclustersAllocated = 0xffffffffUL;

    /// <summary>Bitmap bits 32-63: "subcluster x reads as zeros", all of them.</summary>
    public const ulong AllSubclustersZero = 0xffffffff00000000UL;

    /// <summary>Bit 62: the cluster is compressed (the rest is a compressed cluster descriptor).</summary>
    public bool IsCompressed => (Raw & Qcow2Const.CompressedFlag) != 0;

    /// <summary>Bit 63: refcount is exactly one, the cluster may be written in place.</summary>
    public bool IsCopied => (Raw & Qcow2Const.CopiedFlag) != 0;

    /// <summary>Bit 0 of a standard descriptor: reads as zeros. Only meaningful in version 3 images without
    /// extended L2 entries; "with version 2 or with extended L2 entries, this is always 0".</summary>
    public bool ZeroFlag => !IsCompressed && (Raw & Qcow2Const.ZeroFlag) != 0;

    /// <summary>Bits 9-55 of a standard descriptor: host cluster offset, 0 when unallocated (and for compressed clusters).</summary>
    public ulong HostOffset => IsCompressed ? 0 : Raw & Qcow2Const.OffsetMask;

    /// <summary>A standard cluster with a host cluster that only this entry references (COPIED): data may
    /// be written there in place, without copy on write.</summary>
    public bool IsOwnedHostCluster => !IsCompressed && HostOffset != 0 && IsCopied;

    /// <summary>Bitmap bit x: subcluster <paramref name="subcluster"/> is allocated in the host cluster.</summary>
    public bool IsSubclusterAllocated(int subcluster) => ((SubclusterBitmap >> subcluster) & 1) != 0;

    /// <summary>Bitmap bit 32+x: subcluster <paramref name="subcluster"/> reads as zeros.</summary>
    public bool IsSubclusterZero(int subcluster) => ((SubclusterBitmap >> (SubclustersPerCluster + subcluster)) & 1) != 0;

    /// <summary>A standard entry for a host cluster this image owns alone (COPIED), every subcluster
    /// allocated when the entry is extended.</summary>
    public static L2Entry OwnedCluster(ulong hostOffset, bool extendedL2)
        => new(hostOffset | Qcow2Const.CopiedFlag, extendedL2 ? AllSubclustersAllocated : 0);

    // ------------------------------------------------------------- compressed clusters

    /// <summary>qcow2.txt "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8); bits 0..x-1 are the
    /// host offset, bits x..61 the number of additional 512-byte sectors.</summary>
    private static int CompressedOffsetBits(int clusterBits) => 62 - (clusterBits - 8);

    /// <summary>Host byte offset where the compressed data starts (not cluster aligned).</summary>
    public ulong CompressedHostOffset(int clusterBits) => Raw & ((1UL << CompressedOffsetBits(clusterBits)) - 1);

    /// <summary>Bytes the compressed data may occupy: from its offset to the end of its last 512-byte sector.</summary>
    public ulong CompressedLength(int clusterBits)
    {
        int x = CompressedOffsetBits(clusterBits);
        ulong sectors = ((Raw & ~Qcow2Const.CompressedFlag & ~Qcow2Const.CopiedFlag) >> x) + 1;
        return sectors * 512 - (CompressedHostOffset(clusterBits) & 511);
    }

    /// <summary>The descriptor of <paramref name="length"/> compressed bytes at <paramref name="hostOffset"/>.</summary>
    public static L2Entry Compressed(ulong hostOffset, int length, int clusterBits)
    {
        ulong additionalSectors = ((hostOffset + (ulong)length - 1) >> 9) - (hostOffset >> 9);
        return new(Qcow2Const.CompressedFlag | (additionalSectors << CompressedOffsetBits(clusterBits)) | hostOffset);
    }

    // ------------------------------------------------------------- in an L2 table

    /// <summary>Bytes per entry: 8, or 16 with extended L2 entries.</summary>
    public static int Size(bool extendedL2) => extendedL2 ? 16 : 8;

    /// <summary>Entry <paramref name="index"/> of an L2 table (big endian).</summary>
    public static L2Entry Read(ReadOnlySpan<byte> table, int index, bool extendedL2)
    {
        int at = index * Size(extendedL2);
        ulong descriptor = BinaryPrimitives.ReadUInt64BigEndian(table[at..]);
        return new(descriptor, extendedL2 ? BinaryPrimitives.ReadUInt64BigEndian(table[(at + 8)..]) : 0);
    }

    /// <summary>Stores this entry as entry <paramref name="index"/> of an L2 table.</summary>
    public void WriteTo(Span<byte> table, int index, bool extendedL2)
    {
        int at = index * Size(extendedL2);
        BinaryPrimitives.WriteUInt64BigEndian(table[at..], Raw);
        if (extendedL2) BinaryPrimitives.WriteUInt64BigEndian(table[(at + 8)..], SubclusterBitmap);
    }
}
