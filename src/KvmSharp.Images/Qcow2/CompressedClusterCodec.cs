using System.IO.Compression;
using KvmSharp.Interop;

namespace KvmSharp.Images.Qcow2;

/// <summary>
/// Compressed clusters, qcow2.txt "Compressed Clusters Descriptor" and header field compression_type
/// (0 zlib: raw deflate, as QEMU with window bits -12; 1 zstd). Owns the buffers: one for the
/// compressed bytes, one cluster decompressed and kept for the next read of the same descriptor.
/// <para>Not thread-safe: the image's lock covers it. Decompressing zlib allocates (DeflateStream);
/// nothing else here does after construction.</para>
/// </summary>
internal sealed class CompressedClusterCodec : IDisposable
{
    private readonly byte _compressionType;
    private readonly int _clusterSize;
    private readonly byte[] _compressed;
    private readonly byte[] _decompressed;
    private ulong _cachedDescriptor = ulong.MaxValue; // the descriptor _decompressed holds, or MaxValue
    private ZstdSharp.Decompressor? _zstd;

    public CompressedClusterCodec(byte compressionType, int clusterSize)
    {
        _compressionType = compressionType;
        _clusterSize = clusterSize;
        _compressed = new byte[MaxCompressedLength(clusterSize)];
        _decompressed = new byte[clusterSize];
    }

    /// <summary>The most bytes a descriptor can name: its sector count has cluster_bits - 8 bits, so at most
    /// 2^(cluster_bits - 8) sectors of 512 bytes (twice the cluster), plus a sector of slack.</summary>
    public static int MaxCompressedLength(int clusterSize) => 2 * clusterSize + 512;

    /// <summary>Buffer for compressed bytes read from or written to the file.</summary>
    public Span<byte> CompressedBuffer => _compressed;

    /// <summary>The decompressed cluster of <paramref name="descriptor"/>, when it is the one kept.</summary>
    public bool TryGetCached(ulong descriptor, out ReadOnlySpan<byte> cluster)
    {
        cluster = _decompressed;
        return _cachedDescriptor == descriptor;
    }

    /// <summary>Forgets the kept cluster (its host clusters may be freed and reused).</summary>
    public void ForgetCached() => _cachedDescriptor = ulong.MaxValue;

    /// <summary>Decompresses <paramref name="source"/> into the kept cluster for <paramref name="descriptor"/>;
    /// false (nothing kept) when it is not a valid stream of exactly one cluster.</summary>
    public bool DecompressToCache(ReadOnlySpan<byte> source, ulong descriptor)
    {
        _cachedDescriptor = ulong.MaxValue;
        if (!Decompress(source, _decompressed)) return false;
        _cachedDescriptor = descriptor;
        return true;
    }

    /// <summary>Compresses one whole cluster into <see cref="CompressedBuffer"/>; returns the length, or -1
    /// when it does not fit in a cluster.</summary>
    public int Compress(ReadOnlySpan<byte> cluster)
    {
        var dst = _compressed.AsSpan(0, _clusterSize);
        if (_compressionType == 1)
        {
            using var c = new ZstdSharp.Compressor(3);
            return c.TryWrap(cluster, dst, out int written) ? written : -1;
        }
        try
        {
            return Zlib.DeflateRaw(cluster, dst, windowBits: 12);
        }
        catch (NativeException e)
        {
            throw new ImageException(ImageErrorKind.Io, null, e.Message, -1, e);
        }
    }

    private bool Decompress(ReadOnlySpan<byte> src, byte[] dst)
    {
        if (_compressionType == 1)
        {
            _zstd ??= new ZstdSharp.Decompressor();
            try
            {
                // The descriptor's sector rounding leaves trailing bytes after the frame; bound by frame size.
                ulong frame;
                unsafe
                {
                    // SAFETY: src is pinned for the call and its length is passed alongside.
                    fixed (byte* p = src) frame = ZstdSharp.Unsafe.Methods.ZSTD_findFrameCompressedSize(p, (nuint)src.Length);
                }
                if (ZstdSharp.Unsafe.Methods.ZSTD_isError((nuint)frame)) return false;
                int n = _zstd.Unwrap(src[..(int)frame], dst);
                return n == dst.Length;
            }
            catch (Exception e) when (e is ZstdSharp.ZstdException or ArgumentException or InvalidOperationException) { return false; }
        }
        // zlib: raw deflate (QEMU uses window bits -12). DeflateStream allocates; see README.
        try
        {
            unsafe
            {
                // SAFETY: the stream only reads within src, pinned for the duration of this block.
                fixed (byte* p = src)
                {
                    using var ms = new UnmanagedMemoryStream(p, src.Length);
                    using var ds = new DeflateStream(ms, CompressionMode.Decompress);
                    int done = 0;
                    while (done < dst.Length)
                    {
                        int r = ds.Read(dst, done, dst.Length - done);
                        if (r <= 0) break;
                        done += r;
                    }
                    return done == dst.Length;
                }
            }
        }
        catch (Exception e) when (e is InvalidDataException or IOException) { return false; }
    }

    public void Dispose() => _zstd?.Dispose();
}
