using SharpCompress.Compressors.LZMA;

namespace KvmSharp.Boot;

/// <summary>
/// Decoder for the .xz container as the kernel build writes it (scripts/xz_wrap.sh: CRC32 check,
/// x86 BCJ filter, LZMA2). SharpCompress's XZStream mis-decodes the x86 BCJ filter (its output
/// fails the block CRC on real kernels), so only LZMA2 comes from SharpCompress; the container,
/// the BCJ filter and the checks are done here (.xz file format 1.1.0; xz-embedded xz_dec_bcj.c).
/// Block boundaries come from the index at the end of the stream, not from the LZMA2 decoder.
/// </summary>
internal static class XzDecoder
{
    private const ulong FilterX86 = 0x04;
    private const ulong FilterLzma2 = 0x21;

    private static readonly uint[] Crc32Table = MakeCrc32Table();
    private static readonly ulong[] Crc64Table = MakeCrc64Table();

    /// <summary>Decodes a stream held in a span (a copy is made: the loader passes the kernel's array instead).</summary>
    /// <exception cref="BootException">Malformed, unsupported or corrupt stream, or output above <paramref name="maxOutput"/> bytes.</exception>
    public static byte[] Decode(ReadOnlySpan<byte> xz, int maxOutput, string name) =>
        Decode(xz.ToArray(), 0, xz.Length, new OutputLimit(maxOutput, $"a limit of {maxOutput} bytes"), name);

    /// <summary>
    /// Decodes the stream in <paramref name="data"/>[<paramref name="offset"/>, +<paramref name="length"/>).
    /// The index is read first: the blocks' uncompressed sizes add up to the output size, which is
    /// checked against <paramref name="limit"/> before anything is decoded, and each block is decoded
    /// straight into its place in the one output array (no per-block copies, no growing stream).
    /// </summary>
    /// <exception cref="BootException">Malformed, unsupported or corrupt stream, or output above <paramref name="limit"/>.</exception>
    public static byte[] Decode(byte[] data, int offset, int length, OutputLimit limit, string name)
    {
        var xz = new ReadOnlySpan<byte>(data, offset, length);
        string what = $"The kernel {name}'s xz payload";
        // Stream padding (zeros, multiple of 4) may follow the footer.
        int end = xz.Length;
        while (end >= 4 && end % 4 == 0 && Le.U32(xz, end - 4) == 0)
            end -= 4;
        if (end < 24 || !xz[..6].SequenceEqual((ReadOnlySpan<byte>)[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))
            throw new BootException($"{what} has no xz stream header.");
        if (Crc32(xz.Slice(6, 2)) != Le.U32(xz, 8))
            throw new BootException($"{what} has a corrupt stream header.");
        int check = xz[7] & 0x0f;
        int checkSize = check switch { 0 => 0, 1 => 4, 4 => 8, 10 => 32, _ => -1 };
        if (checkSize < 0 || xz[6] != 0 || (xz[7] & 0xf0) != 0)
            throw new BootException($"{what} uses stream flags 0x{xz[6]:x2}{xz[7]:x2}, which are not supported.");

        // Footer: CRC32, backward size, flags, "YZ".
        var footer = xz.Slice(end - 12, 12);
        if (footer[10] != (byte)'Y' || footer[11] != (byte)'Z' || footer[8] != xz[6] || footer[9] != xz[7])
            throw new BootException($"{what} has no valid stream footer (is the file truncated or followed by more streams?).");
        long indexSize = ((long)Le.U32(footer, 4) + 1) * 4;
        long indexStart = end - 12 - indexSize;
        if (indexStart < 12)
            throw new BootException($"{what} has an index larger than the stream.");
        var index = xz.Slice((int)indexStart, (int)indexSize);
        int ip = 0;
        if (index[ip++] != 0)
            throw new BootException($"{what} has a corrupt index.");
        ulong records = ReadVarint(index, ref ip, what);
        if (records > 4096)
            throw new BootException($"{what} has {records} blocks; at most 4096 are accepted.");

        // Pass 1 (.xz 1.1.0 §4.3, Index Records): the output size, bounded before any allocation.
        int recordsStart = ip;
        ulong total = 0;
        for (ulong r = 0; r < records; r++)
        {
            ReadVarint(index, ref ip, what); // unpadded size, checked in pass 2
            ulong uncompressed = ReadVarint(index, ref ip, what);
            if (uncompressed > (ulong)limit.Bytes - total)
                throw PayloadDecompressor.TooBig("xz", name, limit);
            total += uncompressed;
        }
        if (total == 0)
            throw new BootException($"{what} decompresses to nothing.");

        byte[] output = new byte[(int)total];
        int outPos = 0;
        int pos = 12;
        ip = recordsStart;
        for (ulong r = 0; r < records; r++)
        {
            ulong unpadded = ReadVarint(index, ref ip, what);
            int uncompressed = (int)ReadVarint(index, ref ip, what);
            if (pos >= indexStart)
                throw new BootException($"{what} has more index records than blocks.");
            int headerSize = (xz[pos] + 1) * 4;
            if (xz[pos] == 0 || unpadded < (ulong)(headerSize + checkSize + 1) || unpadded > (ulong)(indexStart - pos))
                throw new BootException($"{what} has a block at offset {pos} whose size is inconsistent with the index.");
            var header = xz.Slice(pos, headerSize);
            if (Crc32(header[..^4]) != Le.U32(header, headerSize - 4))
                throw new BootException($"{what} has a corrupt block header at offset {pos}.");
            var (dictProp, x86Start) = ParseBlockHeader(header, what);
            int dataLength = (int)unpadded - headerSize - checkSize;
            int dataStart = pos + headerSize;
            int checkPos = dataStart + ((dataLength + 3) & ~3);
            if ((long)checkPos + checkSize > indexStart)
                throw new BootException($"{what} has a block at offset {pos} that runs into the index.");

            var input = new MemoryStream(data, offset + dataStart, dataLength, writable: false);
            int n = 0;
            try
            {
                using var lz = LzmaStream.Create([EffectiveDictProp(dictProp, (ulong)uncompressed)], input, dataLength, uncompressed, null, true, false);
                while (n < uncompressed)
                {
                    int got = lz.Read(output, outPos + n, uncompressed - n);
                    if (got <= 0)
                        break;
                    n += got;
                }
            }
            catch (Exception ex) when (ex is not OutOfMemoryException)
            {
                // SharpCompress's LZMA2 decoder reports corrupt data with its own exceptions
                // (DataErrorException, found by fuzz/ target xz); this method's contract is BootException.
                throw new BootException($"{what} has corrupt LZMA2 data in block {r}: {ex.Message}", ex);
            }
            if (n < uncompressed)
                throw new BootException($"{what} ends early in block {r}: {n} of {uncompressed} bytes.");
            var block = output.AsSpan(outPos, uncompressed);
            if (x86Start is { } start)
                X86BcjDecode(block, start);
            VerifyCheck(check, block, xz.Slice(checkPos, checkSize), what, r);
            outPos += uncompressed;
            pos = checkPos + checkSize;
        }
        if (pos != indexStart)
            throw new BootException($"{what} has data between its last block and its index.");
        return output;
    }

    /// <summary>Block header: flags, optional sizes, filter flags. Accepts [x86 BCJ,] LZMA2 only.</summary>
    private static (byte DictProp, uint? X86Start) ParseBlockHeader(ReadOnlySpan<byte> h, string what)
    {
        int p = 1;
        byte flags = h[p++];
        int filters = (flags & 3) + 1;
        if ((flags & 0x3c) != 0)
            throw new BootException($"{what} has a block header with reserved flags set.");
        if ((flags & 0x40) != 0)
            ReadVarint(h, ref p, what);
        if ((flags & 0x80) != 0)
            ReadVarint(h, ref p, what);
        uint? x86 = null;
        for (int i = 0; i < filters; i++)
        {
            ulong id = ReadVarint(h, ref p, what);
            ulong propSize = ReadVarint(h, ref p, what);
            if (propSize > (ulong)(h.Length - 4 - p))
                throw new BootException($"{what} has a block header with filter properties past its end.");
            var props = h.Slice(p, (int)propSize);
            p += (int)propSize;
            bool last = i == filters - 1;
            if (id == FilterLzma2 && last && propSize == 1 && props[0] <= 40)
                return (props[0], x86);
            if (id == FilterX86 && !last && (propSize == 0 || propSize == 4))
            {
                x86 = propSize == 4 ? Le.U32(props, 0) : 0;
                continue;
            }
            throw new BootException($"{what} uses xz filter 0x{id:x} in a chain KvmSharp does not support (only x86 BCJ + LZMA2).");
        }
        throw new BootException($"{what} has a filter chain that does not end in LZMA2.");
    }

    /// <summary>
    /// LZMA2 dictionary size for property byte p (.xz format §5.3.1): 2 or 3 times 2^(p/2 + 11), 4 GiB − 1 for 40.
    /// A dictionary larger than the block's output is never referenced, so the smallest property that
    /// still covers the output is used instead: a hostile header cannot make the decoder allocate 4 GiB.
    /// </summary>
    internal static byte EffectiveDictProp(byte declared, ulong uncompressed)
    {
        for (byte p = 0; p < declared; p++)
        {
            ulong size = (2UL | (p & 1UL)) << (p / 2 + 11);
            if (size >= uncompressed)
                return p;
        }
        return declared;
    }

    private static ulong ReadVarint(ReadOnlySpan<byte> b, ref int p, string what)
    {
        ulong v = 0;
        for (int i = 0; i < 9; i++)
        {
            if (p >= b.Length)
                break;
            byte x = b[p++];
            v |= (ulong)(x & 0x7f) << (7 * i);
            if ((x & 0x80) == 0)
                return v;
        }
        throw new BootException($"{what} has a malformed variable-length integer.");
    }

    private static void VerifyCheck(int check, ReadOnlySpan<byte> data, ReadOnlySpan<byte> stored, string what, ulong block)
    {
        bool ok = check switch
        {
            1 => Crc32(data) == Le.U32(stored, 0),
            4 => Crc64(data) == Le.U64(stored, 0),
            _ => true, // none, or SHA-256 (not verified)
        };
        if (!ok)
            throw new BootException($"{what} fails the check of block {block}: the data is corrupt.");
    }

    /// <summary>The x86 BCJ decoder over one whole block (xz-embedded xz_dec_bcj.c bcj_x86, state starting fresh).</summary>
    internal static void X86BcjDecode(Span<byte> buf, uint startOffset)
    {
        ReadOnlySpan<bool> allowed = [true, true, true, false, true, false, false, false];
        ReadOnlySpan<byte> bitNum = [0, 1, 2, 2, 3, 3, 3, 3];
        static bool TestMsByte(byte b) => b == 0x00 || b == 0xff;
        if (buf.Length <= 4)
            return;
        int size = buf.Length - 4;
        long prevPos = -1;
        uint prevMask = 0;
        for (int i = 0; i < size; i++)
        {
            if ((buf[i] & 0xfe) != 0xe8)
                continue;
            long dist = i - prevPos;
            if (dist > 3)
            {
                prevMask = 0;
            }
            else
            {
                prevMask = (prevMask << (int)(dist - 1)) & 7;
                if (prevMask != 0)
                {
                    byte b = buf[i + 4 - bitNum[(int)prevMask]];
                    if (!allowed[(int)prevMask] || TestMsByte(b))
                    {
                        prevPos = i;
                        prevMask = (prevMask << 1) | 1;
                        continue;
                    }
                }
            }
            prevPos = i;
            if (TestMsByte(buf[i + 4]))
            {
                uint src = Le.U32(buf, i + 1);
                uint dest;
                while (true)
                {
                    dest = src - (startOffset + (uint)i + 5);
                    if (prevMask == 0)
                        break;
                    int j = bitNum[(int)prevMask] * 8;
                    byte b = (byte)(dest >> (24 - j));
                    if (!TestMsByte(b))
                        break;
                    src = dest ^ ((1u << (32 - j)) - 1);
                }
                dest &= 0x01ffffff;
                dest |= 0u - (dest & 0x01000000);
                Le.W32(buf, i + 1, dest);
                i += 4;
            }
            else
            {
                prevMask = (prevMask << 1) | 1;
            }
        }
    }

    internal static uint Crc32(ReadOnlySpan<byte> data)
    {
        uint c = 0xffffffff;
        foreach (byte b in data)
            c = Crc32Table[(c ^ b) & 0xff] ^ (c >> 8);
        return ~c;
    }

    private static ulong Crc64(ReadOnlySpan<byte> data)
    {
        ulong c = ulong.MaxValue;
        foreach (byte b in data)
            c = Crc64Table[(c ^ b) & 0xff] ^ (c >> 8);
        return ~c;
    }

    private static uint[] MakeCrc32Table()
    {
        var t = new uint[256];
        for (uint i = 0; i < 256; i++)
        {
            uint c = i;
            for (int k = 0; k < 8; k++)
                c = (c & 1) != 0 ? 0xedb88320 ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }

    private static ulong[] MakeCrc64Table()
    {
        var t = new ulong[256];
        for (ulong i = 0; i < 256; i++)
        {
            ulong c = i;
            for (int k = 0; k < 8; k++)
                c = (c & 1) != 0 ? 0xc96c5795d7870f42 ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }
}
