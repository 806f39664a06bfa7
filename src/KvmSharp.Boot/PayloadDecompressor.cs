using System.IO.Compression;
using K4os.Compression.LZ4;
using SharpCompress.Compressors;
using ScCompressionMode = SharpCompress.Compressors.CompressionMode;
using SharpCompress.Compressors.BZip2;
using SharpCompress.Compressors.LZMA;
using ZstdSharp;

namespace KvmSharp.Boot;

/// <summary>
/// Decompresses a bzImage payload natively. The kernel's own decompressor runs in guest ring 0, which
/// a PVM host emulates instruction by instruction (&gt; 400 s for xz), so the VMM does it instead.
/// The format is found from the payload's magic number (boot.rst: payload_offset). Every format but
/// gzip has the uncompressed size appended as a 32-bit little-endian trailer (scripts/Makefile.lib
/// size_append); gzip's ISIZE sits at the same place.
/// </summary>
internal static class PayloadDecompressor
{
    /// <summary>Output cap: far above any kernel (~70 MiB), low enough that a decompression bomb cannot exhaust the host.</summary>
    internal const int MaxOutput = 512 << 20;

    /// <summary>LZ4 legacy frame (lz4 -l): magic, then blocks of 4-byte compressed size + LZ4 block, each ≤ 8 MiB decompressed.</summary>
    private const uint Lz4LegacyMagic = 0x184C2102;
    private const int Lz4LegacyBlockSize = 8 << 20;

    public static string? Detect(ReadOnlySpan<byte> p)
    {
        if (p.Length >= 2 && p[0] == 0x1f && p[1] == 0x8b)
            return "gzip";
        if (p.Length >= 6 && p[..6].SequenceEqual((ReadOnlySpan<byte>)[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))
            return "xz";
        if (p.Length >= 3 && p[0] == (byte)'B' && p[1] == (byte)'Z' && p[2] == (byte)'h')
            return "bzip2";
        if (p.Length >= 3 && p[0] == 0x5d && p[1] == 0 && p[2] == 0)
            return "lzma";
        if (p.Length >= 4 && p[..4].SequenceEqual((ReadOnlySpan<byte>)[0x89, 0x4c, 0x5a, 0x4f]))
            return "lzo";
        if (p.Length >= 4 && Le.U32(p, 0) == Lz4LegacyMagic)
            return "lz4";
        if (p.Length >= 4 && p[..4].SequenceEqual((ReadOnlySpan<byte>)[0x28, 0xb5, 0x2f, 0xfd]))
            return "zstd";
        if (ElfKernel.HasElfMagic(p))
            return "none";
        return null;
    }

    /// <exception cref="BootException">Unknown or unsupported format, corrupt data, or output above <see cref="MaxOutput"/>.</exception>
    public static byte[] Decompress(byte[] data, int offset, int length, string format, string name)
    {
        if (format == "none")
            return data.AsSpan(offset, length).ToArray();
        if (format == "lzo")
            throw new BootException($"The kernel {name} is lzo-compressed, which KvmSharp cannot decompress; boot it with in-VMM decompression off or rebuild it with another compression.");
        if (length < 8)
            throw new BootException($"The kernel {name}'s {format} payload is only {length} bytes.");
        // The size trailer is the last 4 bytes of the payload; strip it for every format that
        // appends it so no decoder sees trailing bytes after its stream.
        uint sizeHint = Le.U32(data, offset + length - 4);
        int streamLength = format == "gzip" ? length : length - 4;
        // An xz stream ends in "YZ": when that is the payload's last two bytes, there is no trailer to strip.
        if (format == "xz" && data[offset + length - 2] == (byte)'Y' && data[offset + length - 1] == (byte)'Z')
            streamLength = length;
        try
        {
            return format switch
            {
                "gzip" => ReadAll(new GZipStream(new MemoryStream(data, offset, streamLength, writable: false), System.IO.Compression.CompressionMode.Decompress), sizeHint, format, name),
                "xz" => XzDecoder.Decode(data.AsSpan(offset, streamLength), MaxOutput, name),
                "bzip2" => ReadAll(BZip2Stream.Create(new MemoryStream(data, offset, streamLength, writable: false), ScCompressionMode.Decompress, false, false, false), sizeHint, format, name),
                "lzma" => DecompressLzma(data, offset, streamLength, sizeHint, name),
                "zstd" => ReadAll(new DecompressionStream(new MemoryStream(data, offset, streamLength, writable: false), 1 << 17, true, false), sizeHint, format, name),
                "lz4" => DecompressLz4Legacy(data.AsSpan(offset, streamLength), sizeHint, name),
                _ => throw new BootException($"The kernel {name}'s payload uses compression {format}, which KvmSharp does not know."),
            };
        }
        catch (BootException)
        {
            throw;
        }
        catch (Exception ex)
        {
            throw new BootException($"The kernel {name}'s {format} payload is corrupt: {ex.Message}", ex);
        }
    }

    /// <summary>Legacy .lzma: 5 property bytes, 8-byte size (often "unknown" when piped), then the raw stream.</summary>
    private static byte[] DecompressLzma(byte[] data, int offset, int length, uint sizeHint, string name)
    {
        if (length < 13)
            throw new BootException($"The kernel {name}'s lzma payload is only {length} bytes.");
        byte[] props = data.AsSpan(offset, 5).ToArray();
        ulong declared = Le.U64(data, offset + 5);
        long outSize = declared == ulong.MaxValue ? sizeHint : (long)Math.Min(declared, (ulong)MaxOutput + 1);
        if (outSize > MaxOutput)
            throw TooBig("lzma", name);
        // Cap the dictionary at the output size (at least 4 KiB): a larger one is never referenced,
        // and a hostile header could otherwise ask for a 4 GiB window.
        uint dict = Le.U32(props, 1);
        Le.W32(props, 1, (uint)Math.Max(4096, Math.Min(dict, outSize)));
        var input = new EndCheckedStream(data, offset + 13, length - 13);
        return ReadAll(LzmaStream.Create(props, input, length - 13, outSize, false), (uint)outSize, "lzma", name);
    }

    /// <summary>
    /// The compressed bytes for SharpCompress's LZMA decoder, whose range decoder reads input with
    /// <c>(byte)ReadByte()</c>: past the end it would decode endless 0xFF bytes, so a 23-byte payload
    /// with a large size trailer ran for seconds and ~500 MB before failing (found by fuzz target
    /// payload). A valid stream never needs a byte after its end, so running past it is corruption.
    /// </summary>
    private sealed class EndCheckedStream(byte[] data, int offset, int length) : MemoryStream(data, offset, length, writable: false)
    {
        public override int ReadByte()
        {
            int b = base.ReadByte();
            return b >= 0 ? b : throw new InvalidDataException("the compressed data ends before the stream does");
        }
    }

    private static byte[] DecompressLz4Legacy(ReadOnlySpan<byte> p, uint sizeHint, string name)
    {
        var output = new MemoryStream(Math.Min((int)Math.Min(sizeHint, MaxOutput), 64 << 20));
        byte[] block = new byte[Lz4LegacyBlockSize];
        int pos = 4;
        while (p.Length - pos >= 4)
        {
            uint size = Le.U32(p, pos);
            pos += 4;
            if (size == Lz4LegacyMagic)
                continue; // concatenated frames
            if (size == 0 || size > (uint)(p.Length - pos))
                throw new BootException($"The kernel {name}'s lz4 payload is corrupt: a block of {size} bytes at offset {pos - 4} runs past the payload.");
            int n = LZ4Codec.Decode(p.Slice(pos, (int)size), block);
            if (n < 0)
                throw new BootException($"The kernel {name}'s lz4 payload is corrupt: block at offset {pos - 4} does not decode.");
            if (output.Length + n > MaxOutput)
                throw TooBig("lz4", name);
            output.Write(block, 0, n);
            pos += (int)size;
        }
        return output.ToArray();
    }

    private static byte[] ReadAll(Stream s, uint sizeHint, string format, string name)
    {
        using (s)
        {
            // The size trailer is only a hint (a hostile file can lie): start there, grow as needed, stop at the cap.
            int capacity = (int)Math.Min(Math.Max(sizeHint, 1u << 16), 1u << 28);
            byte[] buf = new byte[capacity];
            int n = 0;
            while (true)
            {
                if (n == buf.Length)
                {
                    if (buf.Length >= MaxOutput)
                    {
                        // Full at the cap: one more byte means a bomb.
                        if (s.ReadByte() < 0)
                            break;
                        throw TooBig(format, name);
                    }
                    Array.Resize(ref buf, (int)Math.Min((long)buf.Length * 2, MaxOutput));
                }
                int r = s.Read(buf, n, buf.Length - n);
                if (r <= 0)
                    break;
                n += r;
            }
            if (n == 0)
                throw new BootException($"The kernel {name}'s {format} payload decompresses to nothing.");
            Array.Resize(ref buf, n);
            return buf;
        }
    }

    private static BootException TooBig(string format, string name) =>
        new($"The kernel {name}'s {format} payload decompresses to more than {MaxOutput >> 20} MiB; refusing it as a decompression bomb.");
}
