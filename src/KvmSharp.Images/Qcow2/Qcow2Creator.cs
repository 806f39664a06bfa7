using System.Buffers.Binary;

namespace KvmSharp.Images.Qcow2;

/// <summary>Options of a new qcow2 image (qemu-img create -o names in comments).</summary>
public sealed class Qcow2CreateOptions
{
    public ulong Size;
    public int ClusterSize = 65536;          // cluster_size
    public int Version = 3;                  // compat=1.1 → 3, compat=0.10 → 2
    public int RefcountBits = 16;            // refcount_bits
    public bool LazyRefcounts;               // lazy_refcounts
    public bool ExtendedL2;                  // extended_l2
    public string? BackingFile;              // -b
    public string? BackingFormat;            // -F
    public byte CompressionType;             // compression_type: 0 zlib, 1 zstd
}

public static class Qcow2Creator
{
    /// <summary>Creates an empty qcow2 image: header, refcount table, one refcount block, then the L1 table.</summary>
    /// <exception cref="ImageException">InvalidArgument for bad options, Io on host failure.</exception>
    public static void Create(string path, Qcow2CreateOptions o)
    {
        int cb = System.Numerics.BitOperations.Log2((uint)o.ClusterSize);
        if (o.ClusterSize <= 0 || 1 << cb != o.ClusterSize || cb < Qcow2Const.MinClusterBits || cb > Qcow2Const.MaxClusterBits)
            ThrowHelper.Throw(ImageErrorKind.InvalidArgument, path, "cluster size must be a power of two between 512 and 2097152");
        if (o.RefcountBits is < 1 or > 64 || (o.RefcountBits & (o.RefcountBits - 1)) != 0)
            ThrowHelper.Throw(ImageErrorKind.InvalidArgument, path, "refcount_bits must be a power of two between 1 and 64");
        if (o.Version == 2 && (o.RefcountBits != 16 || o.LazyRefcounts || o.ExtendedL2 || o.CompressionType != 0))
            ThrowHelper.Throw(ImageErrorKind.InvalidArgument, path, "compat=0.10 supports only refcount_bits=16 and no lazy refcounts, extended L2 or zstd");
        if (o.ExtendedL2 && cb < 14)
            ThrowHelper.Throw(ImageErrorKind.InvalidArgument, path, "extended_l2 requires a cluster size of at least 16 KiB");
        // The L1 table addresses the whole disk and may not exceed MaxL1Bytes (qcow2.txt "l1_size";
        // QEMU's QCOW_MAX_L1_SIZE): the largest disk grows with the cluster size, as qemu-img says.
        ulong bytesPerL1Entry = (ulong)o.ClusterSize * (ulong)(o.ClusterSize / (o.ExtendedL2 ? 16 : 8));
        if (o.Size > Qcow2Const.MaxVirtualSize || (o.Size + bytesPerL1Entry - 1) / bytesPerL1Entry * 8 > Qcow2Const.MaxL1Bytes)
            ThrowHelper.Throw(ImageErrorKind.InvalidArgument, path, "The image size is too large for file format 'qcow2' (try using a larger cluster size)");
        var h = new Qcow2Header
        {
            Version = (uint)o.Version,
            ClusterBits = cb,
            Size = 0,
            RefcountTableOffset = (ulong)o.ClusterSize,
            RefcountTableClusters = 1,
            RefcountOrder = System.Numerics.BitOperations.Log2((uint)o.RefcountBits),
            BackingFile = o.BackingFile,
            BackingFormat = o.BackingFile is null ? null : o.BackingFormat,
            Compatible = o.LazyRefcounts ? Qcow2Const.CompatLazyRefcounts : 0,
            Incompatible = (o.ExtendedL2 ? Qcow2Const.IncompatExtendedL2 : 0) | (o.CompressionType != 0 ? Qcow2Const.IncompatCompression : 0),
            CompressionType = o.CompressionType,
        };
        var buf = new byte[3 * o.ClusterSize];
        h.Write(buf.AsSpan(0, o.ClusterSize));
        // Refcount table entry 0 → refcount block at cluster 2; the block counts clusters 0..2.
        BinaryPrimitives.WriteUInt64BigEndian(buf.AsSpan(o.ClusterSize), 2UL * (ulong)o.ClusterSize);
        var rb = buf.AsSpan(2 * o.ClusterSize, o.ClusterSize);
        for (ulong c = 0; c < 3; c++) RefcountBlock.Set(rb, c, h.RefcountOrder, 1);
        // Emptied only once QEMU's write lock is held: never over an image someone uses.
        using (var f = ImageFile.Create(path))
        try
        {
            RandomAccess.Write(f, buf, 0);
            RandomAccess.FlushToDisk(f);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ImageException(ImageErrorKind.Io, path, $"cannot create: {e.Message}", -1, e);
        }
        // The L1 table is allocated by growing the empty image, through the ordinary allocator.
        if (o.Size > 0)
        {
            using var img = BlockDeviceFactory.OpenQcow2(path, readOnly: false);
            img.FinishOpen();
            img.Resize(o.Size);
        }
    }
}
