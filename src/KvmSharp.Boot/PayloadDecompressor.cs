using System.IO.Compression;
using K4os.Compression.LZ4;
using SharpCompress.Compressors;
using ScCompressionMode = SharpCompress.Compressors.CompressionMode;
using SharpCompress.Compressors.BZip2;
using SharpCompress.Compressors.LZMA;
using ZstdSharp;

namespace KvmSharp.Boot;

/// <summary>
/// The most bytes a payload may decompress to, and why (said in the refusal): the smallest of
/// KvmSharp's cap, the bzImage's init_size and the guest RAM the kernel can occupy.
/// <see cref="GuestRam"/>: the limit is the guest's RAM, so passing it means the guest is too small
/// (not that the payload is a bomb).
/// </summary>
internal readonly record struct OutputLimit(int Bytes, string Why, bool GuestRam = false)
{
    /// <summary>Far above any kernel (~70 MiB), low enough that a decompression bomb cannot exhaust the host.</summary>
    public static OutputLimit Default => new(PayloadDecompressor.MaxOutput, $"KvmSharp's {PayloadDecompressor.MaxOutput >> 20} MiB cap");

    /// <summary>This limit, or <paramref name="bytes"/> when that is smaller.</summary>
    public OutputLimit AtMost(ulong bytes, string why, bool guestRam = false) => bytes < (ulong)Bytes ? new((int)bytes, why, guestRam) : this;
}

/// <summary>
/// Decompresses a bzImage payload natively. The kernel's own decompressor runs in guest ring 0, which
/// a PVM host emulates instruction by instruction (&gt; 400 s for xz), so the VMM does it instead.
/// The format is found from the payload's magic number (boot.rst: payload_offset). Every format but
/// gzip has the uncompressed size appended as a 32-bit little-endian trailer (scripts/Makefile.lib
/// size_append); gzip's ISIZE sits at the same place.
/// <para>Memory: the output is one array of the size the stream really produces, allocated at the
/// size the trailer (or the xz index) claims when that is within the <see cref="OutputLimit"/>;
/// a claim above the limit is refused before anything is decoded, and a stream that produces more
/// than the limit is stopped at the first byte past it. Decoders read the input in place.</para>
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
    public static byte[] Decompress(byte[] data, int offset, int length, string format, string name) =>
        Decompress(data, offset, length, format, name, OutputLimit.Default);

    /// <exception cref="BootException">Unknown or unsupported format, corrupt data, or output above <paramref name="limit"/>.</exception>
    public static byte[] Decompress(byte[] data, int offset, int length, string format, string name, OutputLimit limit)
    {
        if (format == "none")
        {
            if (length > limit.Bytes)
                throw TooBig(format, name, limit);
            return data.AsSpan(offset, length).ToArray();
        }
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
        // The kernel's own decompressor trusts the trailer (arch/x86/boot/compressed/mkpiggy.c reads it as
        // the output length): a claim above the limit is refused before a byte is decoded. xz is
        // checked against its index instead, and lzma against its header.
        if (format is "gzip" or "bzip2" or "zstd" or "lz4" && sizeHint > (uint)limit.Bytes)
            throw TooBig(format, name, limit);
        try
        {
            return format switch
            {
                "gzip" => ReadAll(new GZipStream(new MemoryStream(data, offset, streamLength, writable: false), System.IO.Compression.CompressionMode.Decompress), sizeHint, format, name, limit),
                "xz" => XzDecoder.Decode(data, offset, streamLength, limit, name),
                "bzip2" => ReadAll(BZip2Stream.Create(new MemoryStream(data, offset, streamLength, writable: false), ScCompressionMode.Decompress, false, false, false), sizeHint, format, name, limit),
                "lzma" => DecompressLzma(data, offset, streamLength, sizeHint, name, limit),
                "zstd" => ReadAll(new DecompressionStream(new MemoryStream(data, offset, streamLength, writable: false), 1 << 17, true, false), sizeHint, format, name, limit),
                "lz4" => DecompressLz4Legacy(data.AsSpan(offset, streamLength), sizeHint, name, limit),
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
    private static byte[] DecompressLzma(byte[] data, int offset, int length, uint sizeHint, string name, OutputLimit limit)
    {
        if (length < 13)
            throw new BootException($"The kernel {name}'s lzma payload is only {length} bytes.");
        byte[] props = data.AsSpan(offset, 5).ToArray();
        ulong declared = Le.U64(data, offset + 5);
        ulong outSize = declared == ulong.MaxValue ? sizeHint : declared;
        if (outSize > (ulong)limit.Bytes)
            throw TooBig("lzma", name, limit);
        // Cap the dictionary at the output size (at least 4 KiB): a larger one is never referenced,
        // and a hostile header could otherwise ask for a 4 GiB window.
        uint dict = Le.U32(props, 1);
        Le.W32(props, 1, (uint)Math.Max(4096, Math.Min(dict, outSize)));
        var input = new EndCheckedStream(data, offset + 13, length - 13);
        return ReadAll(LzmaStream.Create(props, input, length - 13, (long)outSize, false), (uint)outSize, "lzma", name, limit);
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

    private static byte[] DecompressLz4Legacy(ReadOnlySpan<byte> p, uint sizeHint, string name, OutputLimit limit)
    {
        var output = new Output(sizeHint, "lz4", name, limit);
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
            output.Append(block.AsSpan(0, n));
            pos += (int)size;
        }
        return output.ToArray();
    }

    private static byte[] ReadAll(Stream s, uint sizeHint, string format, string name, OutputLimit limit)
    {
        using (s)
        {
            var output = new Output(sizeHint, format, name, limit);
            while (output.ReadFrom(s))
            {
            }
            return output.ToArray();
        }
    }

    /// <summary>
    /// The output buffer: starts at the claimed size (the trailer is only a hint: a hostile file can
    /// lie), doubles when a stream produces more, and refuses the first byte past the limit. An honest
    /// claim means one allocation and no copy.
    /// </summary>
    private struct Output(uint sizeHint, string format, string name, OutputLimit limit)
    {
        private byte[] _buffer = new byte[sizeHint is > 0 && sizeHint <= (uint)limit.Bytes ? (int)sizeHint : Math.Min(limit.Bytes, 1 << 16)];
        private int _length;

        /// <summary>Reads once from <paramref name="s"/>; false at its end.</summary>
        public bool ReadFrom(Stream s)
        {
            if (_length == _buffer.Length)
            {
                // Full: only a stream that has more needs a bigger buffer.
                int b = s.ReadByte();
                if (b < 0)
                    return false;
                Grow(1);
                _buffer[_length++] = (byte)b;
            }
            int r = s.Read(_buffer, _length, _buffer.Length - _length);
            _length += Math.Max(r, 0);
            return r > 0;
        }

        public void Append(ReadOnlySpan<byte> data)
        {
            Grow(data.Length);
            data.CopyTo(_buffer.AsSpan(_length));
            _length += data.Length;
        }

        private void Grow(int more)
        {
            long needed = (long)_length + more;
            if (needed > limit.Bytes)
                throw TooBig(format, name, limit);
            if (needed > _buffer.Length)
                Array.Resize(ref _buffer, (int)Math.Min(Math.Max(needed, (long)_buffer.Length * 2), limit.Bytes));
        }

        public byte[] ToArray()
        {
            if (_length == 0)
                throw new BootException($"The kernel {name}'s {format} payload decompresses to nothing.");
            if (_length != _buffer.Length)
                Array.Resize(ref _buffer, _length);
            return _buffer;
        }
    }

    internal static BootException TooBig(string format, string name, OutputLimit limit) => limit.GuestRam
        ? new($"Memory is too small for the kernel {name}: its {format} payload decompresses to more than {limit.Why}.")
        : new($"The kernel {name}'s {format} payload decompresses to more than {limit.Bytes} bytes ({limit.Why}); refusing it as a decompression bomb.");
}
