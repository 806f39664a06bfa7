using KvmSharp.Memory;
using Xunit;

namespace KvmSharp.Boot.Tests;

/// <summary>
/// The loaders' memory is bounded by what the guest can hold, never by what a kernel or initrd file
/// claims or holds: files are sized (fstat) and checked before they are read, devices and pipes are
/// refused, an initrd goes straight into guest memory, and a payload decompresses into one array no
/// larger than init_size and the guest's RAM allow. "Memory" is measured as bytes allocated on the
/// test's thread, which is where the loaders run.
/// </summary>
public sealed class InputBoundsTests : IDisposable
{
    private const ulong MiB = 1UL << 20;
    private readonly string _dir = Directory.CreateTempSubdirectory("kvmsharp-bounds-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>A sparse file: <paramref name="start"/>, then zeros up to <paramref name="length"/> (no disk used).</summary>
    private string Sparse(string name, long length, byte[]? start = null)
    {
        string path = Path.Combine(_dir, name);
        using var f = File.Create(path);
        f.Write(start ?? []);
        f.SetLength(length);
        return path;
    }

    private static long Allocated(Action action)
    {
        long before = GC.GetAllocatedBytesForCurrentThread();
        action();
        return GC.GetAllocatedBytesForCurrentThread() - before;
    }

    [Fact]
    public void Devices_and_empty_files_are_refused_unread()
    {
        string empty = Sparse("empty", 0);
        foreach (string path in new[] { "/dev/zero", "/dev/urandom", empty })
        {
            long bytes = Allocated(() =>
            {
                Assert.Contains($"The kernel file {path} is empty or not a regular file", Assert.Throws<BootException>(() => KernelImage.Load(path)).Message);
                Assert.Contains($"The initrd file {path} is empty or not a regular file", Assert.Throws<BootException>(() => InitrdImage.Open(path)).Message);
            });
            Assert.True(bytes < 1 << 20, $"{bytes} bytes allocated for {path}");
        }
    }

    [Fact]
    public void Files_larger_than_the_guest_can_hold_are_refused_before_they_are_read()
    {
        string huge = Sparse("huge", 3L << 29); // 1.5 GiB
        long bytes = Allocated(() =>
        {
            var e = Assert.Throws<BootException>(() => KernelImage.Load(huge, 63 * MiB));
            Assert.Equal($"Memory is too small for the kernel file {huge}: it is 1610612736 bytes, more than the 63 MiB of guest RAM it can be loaded into.", e.Message);
            e = Assert.Throws<BootException>(() => InitrdImage.Open(huge, 63 * MiB));
            Assert.Equal($"Memory is too small for the initrd file {huge}: it is 1610612736 bytes, more than the 63 MiB of guest RAM it could be placed in.", e.Message);
            // Without a guest to compare with, a kernel file is still capped.
            Assert.Contains("KvmSharp's 1024 MiB limit", Assert.Throws<BootException>(() => KernelImage.Load(Sparse("huger", 3L << 30))).Message);
        });
        Assert.True(bytes < 1 << 20, $"{bytes} bytes allocated");
    }

    [Fact]
    public void An_elf_is_read_only_up_to_its_last_segment()
    {
        // A vmlinux with 1.5 GiB of symbols and debug info after its segments.
        string vmlinux = Sparse("vmlinux", 3L << 29, ElfBuilder.Simple());
        KernelImage? k = null;
        long bytes = Allocated(() => k = KernelImage.Load(vmlinux, 63 * MiB));
        Assert.True(k!.HasPvhEntry);
        Assert.True(bytes < 1 << 20, $"{bytes} bytes allocated");
        using var m = Mem.Create(64 * MiB);
        var r = LinuxLoader.Load(m, k, new BootOptions());
        Assert.Equal(ElfBuilder.KernelBase + 0x11000, r.KernelEnd);
    }

    [Fact]
    public void An_initrd_file_goes_straight_into_guest_memory()
    {
        byte[] content = new byte[24 << 20];
        new Random(15).NextBytes(content);
        string path = Path.Combine(_dir, "initrd");
        File.WriteAllBytes(path, content);
        var kernel = KernelImage.Parse(ElfBuilder.Simple(), "k");
        using var m = Mem.Create(128 * MiB);
        BootResult? r = null;
        long bytes = Allocated(() =>
        {
            using var initrd = InitrdImage.Open(path, 127 * MiB);
            r = LinuxLoader.Load(m, kernel, new BootOptions { Initrd = initrd });
        });
        Assert.True(bytes < 1 << 20, $"{bytes} bytes allocated for a {content.Length}-byte initrd");
        Assert.Equal((ulong)content.Length, r!.InitrdSize);
        Assert.Equal(content, Mem.Read(m, r.InitrdAddress, content.Length));
    }

    /// <summary>A bzImage whose gzip payload is an ELF of <paramref name="elfBytes"/>, with a size trailer of <paramref name="claimed"/>.</summary>
    private static byte[] GzipBzImage(int elfBytes, uint initSize, int? claimed = null)
    {
        byte[] text = new byte[elfBytes - 120]; // ELF header + one program header
        byte[] elf = ElfBuilder.Build([new Seg(ElfBuilder.KernelBase, text, (ulong)text.Length)], ElfBuilder.KernelBase);
        byte[] gz = BzImageBuilder.Gzip(elf);
        if (claimed is { } c)
            ElfBuilder.W32(gz, gz.Length - 4, (uint)c); // ISIZE, the trailer a hostile file can lie in
        return BzImageBuilder.Build(gz, initSize: initSize);
    }

    [Fact]
    public void Payload_output_is_bounded_by_init_size_and_guest_ram()
    {
        // Honest trailer above init_size: refused before anything is decoded.
        var k = KernelImage.Parse(GzipBzImage(9 << 20, initSize: 4 << 20), "bz");
        var e = Assert.Throws<BootException>(() => k.Elf);
        Assert.Contains("more than 4194304 bytes (its setup header's init_size); refusing it as a decompression bomb", e.Message);

        // A lying trailer: decoding stops at the first byte past init_size.
        byte[] liar = GzipBzImage(9 << 20, initSize: 4 << 20, claimed: 1 << 20);
        long bytes = Allocated(() => k = KernelImage.Parse(liar, "bz"));
        Assert.Contains("init_size", Assert.Throws<BootException>(() => k.Elf).Message);
        Assert.True(bytes < 12 << 20, $"{bytes} bytes allocated with a 4 MiB limit");

        // init_size allows it, the guest's RAM does not.
        k = KernelImage.Parse(GzipBzImage(9 << 20, initSize: 16 << 20), "bz", maxLoadBytes: 8 * MiB);
        Assert.Equal("Memory is too small for the kernel bz: its gzip payload decompresses to more than the 8 MiB of guest RAM it can be loaded into.", Assert.Throws<BootException>(() => k.Elf).Message);

        // Both allow it: it loads.
        k = KernelImage.Parse(GzipBzImage(9 << 20, initSize: 16 << 20), "bz", maxLoadBytes: 63 * MiB);
        Assert.Equal(9 << 20, k.ElfBytes.Length);
    }

    [Fact]
    public void An_xz_index_that_claims_too_much_is_refused_before_decoding()
    {
        byte[] data = new byte[9 << 20];
        byte[]? xz = BzImageBuilder.ViaTool("xz", "--format=xz --check=crc32 --lzma2=dict=1MiB -c", data);
        if (xz is null)
            Assert.Skip("xz is not installed.");
        long bytes = Allocated(() =>
        {
            var e = Assert.Throws<BootException>(() => PayloadDecompressor.Decompress(xz, 0, xz.Length, "xz", "t", new OutputLimit(8 << 20, "a test limit")));
            Assert.Contains("more than 8388608 bytes (a test limit)", e.Message);
        });
        Assert.True(bytes < 1 << 20, $"{bytes} bytes allocated");
    }

    public static TheoryData<string> Formats => ["gzip", "zstd", "lz4", "xz", "bzip2"];

    /// <summary>
    /// The output is one array of its final size: no doubling buffer, no copy at the end. Before, a
    /// 500 MiB xz payload peaked at 1.5 GiB. Dictionaries are small here (1 MiB), so what is allocated
    /// beyond the output is the decoders' own state and lz4's 8 MiB block.
    /// </summary>
    [Theory]
    [MemberData(nameof(Formats))]
    public void Decompression_allocates_the_output_once(string format)
    {
        const int Size = 32 << 20;
        byte[] data = new byte[Size];
        for (int i = 0; i < data.Length; i += 512)
            data[i] = (byte)(i >> 9);
        byte[]? payload = format switch
        {
            "gzip" => BzImageBuilder.Gzip(data),
            "zstd" => BzImageBuilder.Zstd(data),
            "lz4" => BzImageBuilder.Lz4Legacy(data),
            "bzip2" => BzImageBuilder.Bzip2(data),
            "xz" => BzImageBuilder.ViaTool("xz", "--format=xz --check=crc32 --x86 --lzma2=dict=1MiB -c", data),
            _ => null,
        };
        if (payload is null)
            Assert.Skip($"The {format} tool is not installed.");
        byte[]? output = null;
        long bytes = Allocated(() => output = PayloadDecompressor.Decompress(payload, 0, payload.Length, format, "t"));
        Assert.Equal(data, output);
        Assert.True(bytes < Size + (12 << 20), $"{bytes >> 20} MiB allocated for {Size >> 20} MiB of {format} output");
    }
}
