using Xunit;

namespace KvmSharp.Boot.Tests;

public class KernelImageTests
{
    private static BootException Fails(byte[] data) => Assert.Throws<BootException>(() => KernelImage.Parse(data, "k"));

    [Fact]
    public void Elf_is_parsed_with_pvh_entry()
    {
        var k = KernelImage.Parse(ElfBuilder.Simple(), "vmlinux");
        Assert.Equal(KernelFormat.Elf, k.Format);
        Assert.Equal(0, k.BootProtocolVersion);
        Assert.Null(k.Compression);
        Assert.True(k.HasPvhEntry);
        Assert.Equal(2047u, k.CommandLineMax);
        Assert.Equal(ElfBuilder.KernelBase, k.Elf.Entry);
        Assert.Equal(ElfBuilder.KernelBase + 0x100, k.Elf.PvhEntry);
        Assert.Equal(ElfBuilder.KernelBase + 0x11000, k.Elf.EndAddress);
    }

    [Fact]
    public void Elf_pvh_note_of_four_bytes_is_read()
    {
        var elf = ElfBuilder.Build([new Seg(0x1000000, new byte[64], 64)], 0x1000000, 0x1000010, pvhDescSize: 4);
        Assert.Equal(0x1000010UL, KernelImage.Parse(elf, "k").Elf.PvhEntry);
    }

    [Fact]
    public void Elf_without_note_has_no_pvh_entry() => Assert.False(KernelImage.Parse(ElfBuilder.Simple(pvh: false), "k").HasPvhEntry);

    [Fact]
    public void Elf_virtual_entry_is_translated_to_physical()
    {
        var elf = ElfBuilder.Build([new Seg(0x1000000, new byte[0x100], 0x100)], 0xffffffff81000040);
        Assert.Equal(0x1000040UL, KernelImage.Parse(elf, "k").Elf.Entry);
    }

    [Fact]
    public void Elf_entry_outside_segments_is_rejected() =>
        Assert.Contains("entry point", Fails(ElfBuilder.Build([new Seg(0x1000000, new byte[16], 16)], 0x2000000)).Message);

    [Fact]
    public void Elf_wrong_machine_type_class_are_rejected()
    {
        Assert.Contains("machine 3", Fails(ElfBuilder.Build([new Seg(0x1000000, new byte[16], 16)], 0x1000000, machine: 3)).Message);
        Assert.Contains("ET_EXEC", Fails(ElfBuilder.Build([new Seg(0x1000000, new byte[16], 16)], 0x1000000, type: 3)).Message);
        var elf32 = ElfBuilder.Simple();
        elf32[4] = 1;
        Assert.Contains("64-bit", Fails(elf32).Message);
    }

    [Fact]
    public void Elf_segment_beyond_file_is_rejected()
    {
        var elf = ElfBuilder.Simple();
        ElfBuilder.W64(elf, 64 + 32, (ulong)elf.Length); // p_filesz of segment 0
        Assert.Contains("truncated", Fails(elf).Message);
    }

    [Fact]
    public void Elf_overflowing_offset_plus_filesz_is_rejected()
    {
        var elf = ElfBuilder.Simple();
        ElfBuilder.W64(elf, 64 + 8, ulong.MaxValue - 8); // p_offset
        Assert.Contains("truncated", Fails(elf).Message);
        elf = ElfBuilder.Simple();
        ElfBuilder.W64(elf, 64 + 32, ulong.MaxValue); // p_filesz
        Assert.Contains("truncated", Fails(elf).Message);
    }

    [Fact]
    public void Elf_filesz_above_memsz_is_rejected()
    {
        var elf = ElfBuilder.Simple();
        ElfBuilder.W64(elf, 64 + 40, 16); // p_memsz < p_filesz
        Assert.Contains("p_filesz", Fails(elf).Message);
    }

    [Fact]
    public void Elf_wrapping_segment_is_rejected()
    {
        var elf = ElfBuilder.Simple();
        ElfBuilder.W64(elf, 64 + 24, ulong.MaxValue - 0x100); // p_paddr
        Assert.Contains("wraps", Fails(elf).Message);
    }

    [Fact]
    public void Elf_huge_phnum_and_table_past_end_are_rejected()
    {
        var elf = ElfBuilder.Simple();
        ElfBuilder.W16(elf, 56, 0xffff);
        Assert.Contains("program headers", Fails(elf).Message);
        elf = ElfBuilder.Simple();
        ElfBuilder.W64(elf, 32, ulong.MaxValue - 10); // e_phoff
        Assert.Contains("truncated", Fails(elf).Message);
        elf = ElfBuilder.Simple();
        ElfBuilder.W16(elf, 54, 20); // e_phentsize
        Assert.Contains("56", Fails(elf).Message);
    }

    [Fact]
    public void Elf_truncated_header_is_rejected() => Assert.Contains("truncated", Fails(ElfBuilder.Simple()[..40]).Message);

    [Fact]
    public void Garbage_is_neither_bzImage_nor_elf()
    {
        var e = Fails(new byte[4096]);
        Assert.Equal("The kernel file k is not a bzImage or ELF vmlinux.", e.Message);
    }

    [Fact]
    public void Missing_file_names_the_path()
    {
        var e = Assert.Throws<BootException>(() => KernelImage.Load("/nonexistent/dir/vmlinuz-x"));
        Assert.Contains("/nonexistent/dir/vmlinuz-x", e.Message);
    }

    [Fact]
    public void Load_reads_a_file_and_reports_a_directory_clearly()
    {
        string dir = Path.Combine(Path.GetTempPath(), "kvmsharp-boot-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            string file = Path.Combine(dir, "vmlinux");
            File.WriteAllBytes(file, ElfBuilder.Simple());
            var k = KernelImage.Load(file);
            Assert.Equal(file, k.Name);
            Assert.True(k.HasPvhEntry);
            var e = Assert.Throws<BootException>(() => KernelImage.Load(dir));
            Assert.Contains(dir, e.Message);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void BzImage_gzip_is_parsed_and_decompressed()
    {
        byte[] elf = ElfBuilder.Simple();
        var k = KernelImage.Parse(BzImageBuilder.Build(BzImageBuilder.Gzip(elf)), "bz");
        Assert.Equal(KernelFormat.BzImage, k.Format);
        Assert.Equal(0x020f, k.BootProtocolVersion);
        Assert.Equal("gzip", k.Compression);
        Assert.True(k.HasPvhEntry);
        Assert.Equal(2047u, k.CommandLineMax);
        Assert.Equal(0x1000000UL, k.PreferredAddress);
        Assert.Equal(0x200000u, k.KernelAlignment);
        Assert.True(k.Relocatable);
        Assert.Equal(elf, k.ElfBytes);
        Assert.Equal(0x26c - 0x1f1, k.SetupHeaderLength);
        Assert.Equal("bzImage protocol 2.15, gzip payload, PVH entry", k.ToString());
        Assert.Equal("ELF vmlinux", KernelImage.Parse(ElfBuilder.Simple(pvh: false), "e").ToString());
    }

    public static TheoryData<string> Formats => ["zstd", "lz4", "bzip2", "xz", "lzma"];

    [Theory]
    [MemberData(nameof(Formats))]
    public void BzImage_payload_formats_decompress(string format)
    {
        // Large and repetitive enough that lz4 and bzip2 produce several blocks.
        byte[] padding = new byte[9 << 20];
        for (int i = 0; i < padding.Length; i += 4096)
            padding[i] = (byte)(i >> 12);
        byte[] elf = ElfBuilder.Build([new Seg(0x1000000, padding, (ulong)padding.Length)], 0x1000000, 0x1000100);
        byte[]? payload = format switch
        {
            "zstd" => BzImageBuilder.Zstd(elf),
            "lz4" => BzImageBuilder.Lz4Legacy(elf),
            "bzip2" => BzImageBuilder.Bzip2(elf),
            "xz" => BzImageBuilder.ViaTool("xz", "--format=xz --check=crc32 --x86 --lzma2=dict=1MiB -c", elf),
            "lzma" => BzImageBuilder.ViaTool("lzma", "-9 -c", elf),
            _ => null,
        };
        if (payload is null)
            Assert.Skip($"The {format} tool is not installed.");
        // init_size covers the decompressed size, as arch/x86/boot/header.S guarantees for real kernels.
        var k = KernelImage.Parse(BzImageBuilder.Build(payload, initSize: 16 << 20), "bz");
        Assert.Equal(format, k.Compression);
        Assert.True(k.HasPvhEntry);
        Assert.Equal(elf, k.ElfBytes);
    }

    [Fact]
    public void BzImage_lzo_payload_is_named_unsupported_but_still_parses()
    {
        byte[] payload = [0x89, 0x4c, 0x5a, 0x4f, 0, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3, 4, 5, 6, 7];
        var k = KernelImage.Parse(BzImageBuilder.Build(payload), "bz");
        Assert.Equal("lzo", k.Compression);
        Assert.False(k.HasPvhEntry);
        var e = Assert.Throws<BootException>(() => k.Elf);
        Assert.Contains("lzo", e.Message);
    }

    [Fact]
    public void BzImage_corrupt_payload_is_reported_when_used()
    {
        byte[] gz = BzImageBuilder.Gzip(ElfBuilder.Simple());
        for (int i = 20; i < gz.Length - 8; i++)
            gz[i] ^= 0x5a;
        var k = KernelImage.Parse(BzImageBuilder.Build(gz), "bz");
        var e = Assert.Throws<BootException>(() => k.Elf);
        Assert.Contains("gzip", e.Message);
    }

    [Fact]
    public void BzImage_payload_that_is_not_elf_is_rejected_when_used()
    {
        var k = KernelImage.Parse(BzImageBuilder.Build(BzImageBuilder.Gzip(new byte[5000])), "bz");
        Assert.Contains("not an ELF", Assert.Throws<BootException>(() => k.Elf).Message);
    }

    [Fact]
    public void BzImage_bad_boot_flag_or_magic_is_rejected()
    {
        var bz = BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()));
        bz[0x1fe] = 0;
        Assert.Contains("not a bzImage", Fails(bz).Message);
        bz = BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()));
        bz[0x203] = (byte)'X';
        Assert.Contains("not a bzImage", Fails(bz).Message);
    }

    [Fact]
    public void BzImage_old_protocol_is_rejected()
    {
        var e = Fails(BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()), version: 0x0204));
        Assert.Contains("2.04", e.Message);
        Assert.Contains("2.06", e.Message);
    }

    [Fact]
    public void BzImage_truncated_in_setup_or_protected_mode_part_is_rejected()
    {
        var bz = BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()));
        Assert.Contains("truncated", Fails(bz[..0x400]).Message);
        Assert.Contains("truncated", Fails(bz[..0x240]).Message);
        Assert.Contains("truncated", Fails(bz[..(bz.Length - 64)]).Message);
    }

    [Fact]
    public void BzImage_setup_sects_beyond_file_is_rejected()
    {
        var bz = BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()));
        bz[0x1f1] = 255; // (255+1)*512 = 128 KiB of setup, larger than the file
        Assert.Contains("setup code", Fails(bz).Message);
    }

    [Fact]
    public void BzImage_setup_sects_zero_means_four()
    {
        var bz = BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()), setupSects: 0);
        Assert.Equal(5 * 512, KernelImage.Parse(bz, "bz").SetupSize);
    }

    [Fact]
    public void BzImage_payload_outside_protected_mode_part_is_rejected()
    {
        var bz = BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()));
        ElfBuilder.W32(bz, 0x24c, 0xffffff00); // payload_length
        Assert.Contains("payload", Fails(bz).Message);
        bz = BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()));
        ElfBuilder.W32(bz, 0x248, 0xfffffff0); // payload_offset: offset + length overflows 32 bits
        Assert.Contains("payload", Fails(bz).Message);
    }

    [Fact]
    public void BzImage_version_2_06_has_no_payload_fields()
    {
        var k = KernelImage.Parse(BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()), version: 0x0206), "bz");
        Assert.Null(k.Compression);
        Assert.Contains("2.08", Assert.Throws<BootException>(() => k.Elf).Message);
    }

    [Fact]
    public void Decompression_bomb_is_capped()
    {
        // 600 MiB of zeros is ~600 KiB of gzip; the cap is 512 MiB.
        var ms = new MemoryStream();
        using (var gz = new System.IO.Compression.GZipStream(ms, System.IO.Compression.CompressionLevel.Fastest, true))
        {
            byte[] zeros = new byte[1 << 20];
            for (int i = 0; i < 600; i++)
                gz.Write(zeros);
        }
        var k = KernelImage.Parse(BzImageBuilder.Build(ms.ToArray()), "bz");
        Assert.Contains("decompression bomb", Assert.Throws<BootException>(() => k.Elf).Message);
    }
}
