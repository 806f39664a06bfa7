using KvmSharp.Memory;
using Xunit;

namespace KvmSharp.Boot.Tests;

/// <summary>
/// Structure-aware mutation tests with fixed seeds (style.md §7 "Hostile input", after Cloud
/// Hypervisor's fuzz/linux_loader.rs): every mutated kernel either parses and loads, or fails with a
/// BootException — never another exception type (GuestMemoryException would mean an unchecked
/// placement; IndexOutOfRange/Overflow an unchecked field).
/// </summary>
public class MutationTests
{
    private static readonly ulong[] Interesting =
    [
        0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0xfff, 0x1000, 0x7fff, 0x8000, 0xffff, 0x10000, 0x100000, 0x1000000,
        0x7fffffff, 0x80000000, 0xfffffff0, 0xffffffff, 0x100000000, 0x7fffffffffffffff, 0xffffffff80000000,
        0xfffffffffffffff0, ulong.MaxValue,
    ];

    private static void Mutate(Random rng, byte[] data, int hotLength)
    {
        int n = rng.Next(1, 6);
        for (int k = 0; k < n; k++)
        {
            int at = rng.Next(Math.Min(hotLength, data.Length));
            switch (rng.Next(4))
            {
                case 0:
                    data[at] ^= (byte)(1 << rng.Next(8));
                    break;
                case 1:
                    data[at] = (byte)rng.Next(256);
                    break;
                default:
                    ulong v = Interesting[rng.Next(Interesting.Length)];
                    int width = new[] { 1, 2, 4, 8 }[rng.Next(4)];
                    for (int i = 0; i < width && at + i < data.Length; i++)
                        data[at + i] = (byte)(v >> (8 * i));
                    break;
            }
        }
    }

    private static void Exercise(byte[] data, GuestMemory memory, Random rng)
    {
        try
        {
            var k = KernelImage.Parse(data, "fuzz");
            _ = k.HasPvhEntry;
            var options = new BootOptions
            {
                CommandLine = "console=ttyS0",
                Initrd = rng.Next(2) == 0 ? new byte[rng.Next(1, 1 << 20)] : null,
                DecompressInVmm = rng.Next(4) != 0,
                PreferPvh = rng.Next(2) == 0,
                CpuCount = rng.Next(1, 9),
            };
            LinuxLoader.Load(memory, k, options);
        }
        catch (BootException)
        {
        }
    }

    [Fact]
    public void Mutated_elf_headers_end_in_success_or_BootException()
    {
        var rng = new Random(20261126);
        using var memory = Mem.Create(40 * Mem.MiB);
        byte[] seed = ElfBuilder.Build(
            [new Seg(0x1000000, new byte[0x2000], 0x4000), new Seg(0x1200000, new byte[0x800], 0x800)],
            0x1000000, 0x1000010);
        int ok = 0;
        for (int iter = 0; iter < 4000; iter++)
        {
            byte[] data = (byte[])seed.Clone();
            Mutate(rng, data, 64 + 56 * 3 + 24);
            if (rng.Next(10) == 0)
                data = data[..rng.Next(data.Length)];
            Exercise(data, memory, rng);
            ok++;
        }
        Assert.Equal(4000, ok);
    }

    public static TheoryData<string> Payloads => ["none", "gzip", "lz4", "zstd", "xz"];

    [Theory]
    [MemberData(nameof(Payloads))]
    public void Mutated_bzImages_end_in_success_or_BootException(string format)
    {
        byte[] elf = ElfBuilder.Build([new Seg(0x1000000, Enumerable.Range(0, 0x3000).Select(i => (byte)(i * 13)).ToArray(), 0x5000)], 0x1000000, 0x1000010);
        byte[]? payload = format switch
        {
            "none" => elf,
            "gzip" => BzImageBuilder.Gzip(elf),
            "lz4" => BzImageBuilder.Lz4Legacy(elf),
            "zstd" => BzImageBuilder.Zstd(elf),
            "xz" => BzImageBuilder.ViaTool("xz", "--format=xz --check=crc32 --x86 --lzma2=dict=1MiB -c", elf),
            _ => null,
        };
        if (payload is null)
            Assert.Skip($"The {format} tool is not installed.");
        byte[] seed = BzImageBuilder.Build(payload);
        Assert.True(KernelImage.Parse(seed, "seed").HasPvhEntry);
        int setupSize = 5 * 512;
        var rng = new Random(format.Length * 7919 + format[0]);
        using var memory = Mem.Create(40 * Mem.MiB);
        for (int iter = 0; iter < 1500; iter++)
        {
            byte[] data = (byte[])seed.Clone();
            switch (rng.Next(4))
            {
                case 0: // setup header
                    Mutate(rng, data, 0x270);
                    break;
                case 1: // payload bytes (the compressed stream and the ELF inside it)
                    for (int i = rng.Next(1, 4); i > 0; i--)
                        data[setupSize + 0x100 + rng.Next(payload.Length)] ^= (byte)(1 << rng.Next(8));
                    break;
                case 2: // truncation
                    data = data[..rng.Next(data.Length)];
                    break;
                default: // header fields that steer the parser
                    int[] fields = [0x1f1, 0x1f4, 0x201, 0x206, 0x22c, 0x230, 0x234, 0x236, 0x238, 0x248, 0x24c, 0x258, 0x260];
                    int f = fields[rng.Next(fields.Length)];
                    ulong v = Interesting[rng.Next(Interesting.Length)];
                    for (int i = 0; i < 4; i++)
                        data[f + i] = (byte)(v >> (8 * i));
                    break;
            }
            Exercise(data, memory, rng);
        }
    }

    [Fact]
    public void Random_bytes_are_rejected_cleanly()
    {
        var rng = new Random(42);
        using var memory = Mem.Create(40 * Mem.MiB);
        for (int iter = 0; iter < 500; iter++)
        {
            byte[] data = new byte[rng.Next(0, 5000)];
            rng.NextBytes(data);
            if (data.Length > 0x210 && rng.Next(2) == 0)
            {
                data[0x1fe] = 0x55;
                data[0x1ff] = 0xaa;
                "HdrS"u8.CopyTo(data.AsSpan(0x202));
            }
            else if (data.Length > 4 && rng.Next(3) == 0)
            {
                "\x7fELF"u8.CopyTo(data);
            }
            Exercise(data, memory, rng);
        }
    }
}
