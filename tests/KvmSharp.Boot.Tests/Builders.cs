using System.Buffers.Binary;
using System.Diagnostics;
using System.IO.Compression;
using K4os.Compression.LZ4;
using KvmSharp.Memory;

namespace KvmSharp.Boot.Tests;

/// <summary>A PT_LOAD segment for <see cref="ElfBuilder"/>.</summary>
internal sealed record Seg(ulong PAddr, byte[] Data, ulong MemSize, ulong VAddr = 0);

/// <summary>Builds small ELF64 x86-64 executables shaped like vmlinux.</summary>
internal static class ElfBuilder
{
    public const ulong KernelBase = 0x1000000;

    public static byte[] Build(IReadOnlyList<Seg> segs, ulong entry, uint? pvhEntry = null, int pvhDescSize = 8, ushort type = 2, ushort machine = 62)
    {
        int phnum = segs.Count + (pvhEntry is null ? 0 : 1);
        int phoff = 64;
        int dataStart = phoff + 56 * phnum;
        var ms = new MemoryStream();
        ms.Write(new byte[dataStart]);
        var offsets = new List<long>();
        foreach (var s in segs)
        {
            offsets.Add(ms.Position);
            ms.Write(s.Data);
        }
        long noteOff = ms.Position;
        byte[] note = [];
        if (pvhEntry is { } pe)
        {
            note = new byte[12 + 4 + pvhDescSize];
            BinaryPrimitives.WriteUInt32LittleEndian(note, 4);
            BinaryPrimitives.WriteUInt32LittleEndian(note.AsSpan(4), (uint)pvhDescSize);
            BinaryPrimitives.WriteUInt32LittleEndian(note.AsSpan(8), 18);
            "Xen\0"u8.CopyTo(note.AsSpan(12));
            if (pvhDescSize == 8)
                BinaryPrimitives.WriteUInt64LittleEndian(note.AsSpan(16), pe);
            else
                BinaryPrimitives.WriteUInt32LittleEndian(note.AsSpan(16), pe);
            ms.Write(note);
        }
        byte[] f = ms.ToArray();
        "\x7f"u8.CopyTo(f);
        "ELF"u8.CopyTo(f.AsSpan(1));
        f[4] = 2; f[5] = 1; f[6] = 1;
        W16(f, 16, type);
        W16(f, 18, machine);
        W32(f, 20, 1);
        W64(f, 24, entry);
        W64(f, 32, (ulong)phoff);
        W16(f, 52, 64);
        W16(f, 54, 56);
        W16(f, 56, (ushort)phnum);
        for (int i = 0; i < segs.Count; i++)
        {
            int p = phoff + i * 56;
            W32(f, p, 1);
            W32(f, p + 4, 7);
            W64(f, p + 8, (ulong)offsets[i]);
            W64(f, p + 16, segs[i].VAddr == 0 ? segs[i].PAddr + 0xffffffff80000000UL : segs[i].VAddr);
            W64(f, p + 24, segs[i].PAddr);
            W64(f, p + 32, (ulong)segs[i].Data.Length);
            W64(f, p + 40, segs[i].MemSize);
            W64(f, p + 48, 0x200000);
        }
        if (pvhEntry is not null)
        {
            int p = phoff + segs.Count * 56;
            W32(f, p, 4);
            W64(f, p + 8, (ulong)noteOff);
            W64(f, p + 32, (ulong)note.Length);
            W64(f, p + 40, (ulong)note.Length);
            W64(f, p + 48, 4);
        }
        return f;
    }

    /// <summary>A vmlinux-like ELF: text at 16 MiB with 4 KiB of pattern bytes and 64 KiB of BSS, PVH entry at +0x100.</summary>
    public static byte[] Simple(bool pvh = true)
    {
        byte[] text = new byte[0x1000];
        for (int i = 0; i < text.Length; i++)
            text[i] = (byte)(i * 7 + 1);
        return Build([new Seg(KernelBase, text, 0x11000)], KernelBase, pvh ? (uint)(KernelBase + 0x100) : null);
    }

    public static void W16(byte[] b, int o, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(o), v);
    public static void W32(byte[] b, int o, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(o), v);
    public static void W64(byte[] b, int o, ulong v) => BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(o), v);
}

/// <summary>Builds bzImage files: real-mode setup with a setup header, protected-mode part holding a compressed payload.</summary>
internal static class BzImageBuilder
{
    public static byte[] Build(byte[] payload, ushort version = 0x020f, byte setupSects = 4, ushort xloadflags = 0x7f,
        uint cmdlineSize = 2047, uint initSize = 0x200000, ulong prefAddress = 0x1000000, bool relocatable = true, int pmPrefix = 0x100)
    {
        int setupSize = (setupSects == 0 ? 4 : setupSects) * 512 + 512;
        // protected-mode part: some "decompressor" bytes, then the payload, then a CRC-ish tail
        int pmLength = pmPrefix + payload.Length + 4;
        pmLength = (pmLength + 15) & ~15;
        byte[] f = new byte[setupSize + pmLength];
        f[0x1f1] = setupSects;
        ElfBuilder.W32(f, 0x1f4, (uint)(pmLength / 16));
        ElfBuilder.W16(f, 0x1fa, 0xffff);
        ElfBuilder.W16(f, 0x1fe, 0xAA55);
        f[0x200] = 0xeb;
        f[0x201] = 0x6a; // header ends at 0x26c
        "HdrS"u8.CopyTo(f.AsSpan(0x202));
        ElfBuilder.W16(f, 0x206, version);
        f[0x211] = 0x01; // LOADED_HIGH
        ElfBuilder.W32(f, 0x214, 0x100000);
        ElfBuilder.W32(f, 0x22c, 0x7fffffff);
        ElfBuilder.W32(f, 0x230, 0x200000);
        f[0x234] = relocatable ? (byte)1 : (byte)0;
        f[0x235] = 21;
        ElfBuilder.W16(f, 0x236, xloadflags);
        ElfBuilder.W32(f, 0x238, cmdlineSize);
        ElfBuilder.W32(f, 0x248, (uint)pmPrefix);
        ElfBuilder.W32(f, 0x24c, (uint)payload.Length);
        ElfBuilder.W64(f, 0x258, prefAddress);
        ElfBuilder.W32(f, 0x260, initSize);
        payload.CopyTo(f, setupSize + pmPrefix);
        for (int i = 0; i < pmPrefix; i++)
            f[setupSize + i] = 0x90;
        return f;
    }

    /// <summary>gzip of <paramref name="data"/> (ISIZE is the trailer the kernel build relies on).</summary>
    public static byte[] Gzip(byte[] data)
    {
        var ms = new MemoryStream();
        using (var gz = new GZipStream(ms, CompressionLevel.Optimal, leaveOpen: true))
            gz.Write(data);
        return ms.ToArray();
    }

    /// <summary>data followed by the 32-bit size trailer (scripts/Makefile.lib size_append).</summary>
    public static byte[] WithSize(byte[] compressed, int size)
    {
        byte[] r = new byte[compressed.Length + 4];
        compressed.CopyTo(r, 0);
        BinaryPrimitives.WriteUInt32LittleEndian(r.AsSpan(compressed.Length), (uint)size);
        return r;
    }

    public static byte[] Zstd(byte[] data)
    {
        using var c = new ZstdSharp.Compressor(19);
        return WithSize(c.Wrap(data).ToArray(), data.Length);
    }

    /// <summary>LZ4 legacy frame (lz4 -l): magic, then [size][block] for every 8 MiB of input.</summary>
    public static byte[] Lz4Legacy(byte[] data)
    {
        var ms = new MemoryStream();
        ms.Write([0x02, 0x21, 0x4c, 0x18]);
        for (int off = 0; off < data.Length; off += 8 << 20)
        {
            int n = Math.Min(8 << 20, data.Length - off);
            byte[] block = new byte[LZ4Codec.MaximumOutputSize(n)];
            int c = LZ4Codec.Encode(data.AsSpan(off, n), block, LZ4Level.L12_MAX);
            byte[] len = new byte[4];
            BinaryPrimitives.WriteUInt32LittleEndian(len, (uint)c);
            ms.Write(len);
            ms.Write(block, 0, c);
        }
        return WithSize(ms.ToArray(), data.Length);
    }

    public static byte[] Bzip2(byte[] data)
    {
        var ms = new MemoryStream();
        using (var bz = SharpCompress.Compressors.BZip2.BZip2Stream.Create(ms, SharpCompress.Compressors.CompressionMode.Compress, false, true, false))
            bz.Write(data);
        return WithSize(ms.ToArray(), data.Length);
    }

    /// <summary>Runs a compressor CLI (xz, lzma) like the kernel build does; null when it is not installed.</summary>
    public static byte[]? ViaTool(string tool, string args, byte[] data)
    {
        string? path = new[] { "/usr/bin/", "/bin/", "/usr/local/bin/" }.Select(d => d + tool).FirstOrDefault(File.Exists);
        if (path is null)
            return null;
        var psi = new ProcessStartInfo(path, args) { RedirectStandardInput = true, RedirectStandardOutput = true, UseShellExecute = false };
        using var p = Process.Start(psi)!;
        var output = new MemoryStream();
        var copy = p.StandardOutput.BaseStream.CopyToAsync(output);
        p.StandardInput.BaseStream.Write(data);
        p.StandardInput.Close();
        copy.Wait();
        p.WaitForExit();
        return p.ExitCode == 0 ? WithSize(output.ToArray(), data.Length) : null;
    }
}

internal static class Mem
{
    public const ulong MiB = 1UL << 20;

    public static GuestMemory Create(ulong size) => GuestMemory.CreateForTesting(MemoryLayout.RamRanges(size));

    public static byte[] Read(GuestMemory m, ulong addr, int len)
    {
        byte[] b = new byte[len];
        m.Read(new GuestAddress(addr), b);
        return b;
    }

    public static uint U32(GuestMemory m, ulong addr) => BinaryPrimitives.ReadUInt32LittleEndian(Read(m, addr, 4));
    public static ulong U64(GuestMemory m, ulong addr) => BinaryPrimitives.ReadUInt64LittleEndian(Read(m, addr, 8));
    public static ushort U16(GuestMemory m, ulong addr) => BinaryPrimitives.ReadUInt16LittleEndian(Read(m, addr, 2));
}
