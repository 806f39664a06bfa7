using System.Text;
using KvmSharp.Memory;
using Xunit;

namespace KvmSharp.Boot.Tests;

public class LinuxLoaderTests
{
    private static readonly KernelImage Elf = KernelImage.Parse(ElfBuilder.Simple(), "vmlinux");

    [Fact]
    public void Elf_long64_loads_segments_and_zeroes_bss()
    {
        using var m = Mem.Create(128 * Mem.MiB);
        // Dirty the BSS area first: the loader must zero it.
        m.Write(new GuestAddress(0x1001000), Enumerable.Repeat((byte)0xcc, 0x10000).ToArray());
        var r = LinuxLoader.Load(m, Elf, new BootOptions { CommandLine = "console=ttyS0" });
        Assert.Equal(BootEntryMode.Long64, r.Mode);
        Assert.Equal(0x1000000UL, r.EntryPoint);
        Assert.Equal(LowMemory.ZeroPage, r.BootInfoAddress);
        Assert.Equal(LowMemory.Pml4, r.PageTableBase);
        Assert.Equal(LowMemory.StackPointer, r.StackPointer);
        Assert.Equal(ElfBuilder.KernelBase + 0x11000, r.KernelEnd);
        Assert.Equal((0x80000011UL, 0x20UL, 0x500UL, 2UL), (r.Cr0, r.Cr4, r.Efer, r.Rflags));
        byte[] text = Mem.Read(m, 0x1000000, 0x1000);
        Assert.Equal((byte)1, text[0]);
        Assert.Equal(unchecked((byte)(0xfff * 7 + 1)), text[0xfff]);
        Assert.All(Mem.Read(m, 0x1001000, 0x10000), b => Assert.Equal(0, b));
    }

    [Fact]
    public void Zero_page_for_elf_has_synthesized_header_cmdline_and_e820()
    {
        using var m = Mem.Create(128 * Mem.MiB);
        var r = LinuxLoader.Load(m, Elf, new BootOptions { CommandLine = "console=ttyS0 panic=1" });
        ulong zp = r.BootInfoAddress;
        Assert.Equal(0xAA55, Mem.U16(m, zp + 0x1fe));
        Assert.Equal(0x53726448u, Mem.U32(m, zp + 0x202));
        Assert.Equal(0x020f, Mem.U16(m, zp + 0x206));
        Assert.Equal(0xff, Mem.Read(m, zp + 0x210, 1)[0]);
        Assert.Equal(0x81, Mem.Read(m, zp + 0x211, 1)[0]); // LOADED_HIGH | CAN_USE_HEAP
        Assert.Equal(0x1000000u, Mem.U32(m, zp + 0x230));
        Assert.Equal((uint)LowMemory.CommandLine, Mem.U32(m, zp + 0x228));
        Assert.Equal(0u, Mem.U32(m, zp + 0x218));
        Assert.Equal("console=ttyS0 panic=1\0", Encoding.ASCII.GetString(Mem.Read(m, LowMemory.CommandLine, 22)));
        int n = Mem.Read(m, zp + 0x1e8, 1)[0];
        Assert.Equal(3, n);
        var expected = E820.Build(m);
        for (int i = 0; i < n; i++)
        {
            ulong e = zp + 0x2d0 + (ulong)i * 20;
            Assert.Equal(expected[i].Address, Mem.U64(m, e));
            Assert.Equal(expected[i].Size, Mem.U64(m, e + 8));
            Assert.Equal((uint)expected[i].Type, Mem.U32(m, e + 16));
        }
        Assert.Equal(0, Mem.Read(m, zp + 0x1ef, 1)[0]); // sentinel
    }

    [Fact]
    public void Page_tables_identity_map_four_gib_with_2mib_pages()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        var r = LinuxLoader.Load(m, Elf, new BootOptions());
        Assert.Equal(LowMemory.Pdpt | 3, Mem.U64(m, r.PageTableBase));
        Assert.Equal(0UL, Mem.U64(m, r.PageTableBase + 8));
        for (ulong va = 0; va < (4UL << 30); va += 0x1234567)
            Assert.Equal(va, Translate(m, r.PageTableBase, va));
    }

    private static ulong Translate(GuestMemory m, ulong cr3, ulong va)
    {
        ulong pml4e = Mem.U64(m, cr3 + ((va >> 39) & 511) * 8);
        Assert.True((pml4e & 1) != 0);
        ulong pdpte = Mem.U64(m, (pml4e & 0xffffffffff000) + ((va >> 30) & 511) * 8);
        Assert.True((pdpte & 1) != 0);
        Assert.True((pdpte & 0x80) == 0);
        ulong pde = Mem.U64(m, (pdpte & 0xffffffffff000) + ((va >> 21) & 511) * 8);
        Assert.Equal(0x83UL, pde & 0x83);
        return (pde & 0xfffffffe00000) | (va & 0x1fffff);
    }

    [Fact]
    public void Long64_gdt_has_boot_cs_and_ds()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        var r = LinuxLoader.Load(m, Elf, new BootOptions());
        Assert.Equal(LowMemory.Gdt, r.GdtBase);
        Assert.Equal(47, r.GdtLimit);
        Assert.Equal((ushort)0x10, r.CodeSelector);
        Assert.Equal((ushort)0x18, r.DataSelector);
        Assert.Equal((ushort)0x20, r.TssSelector);
        Assert.Equal(0x00af9b000000ffffUL, Mem.U64(m, r.GdtBase + 0x10));
        Assert.Equal(0x00cf93000000ffffUL, Mem.U64(m, r.GdtBase + 0x18));
        var cs = r.CodeSegment;
        Assert.True(cs.L);
        Assert.False(cs.Db);
        Assert.True(cs.Present);
        Assert.True(cs.S);
        Assert.Equal(0xb, cs.Type);
        Assert.Equal(0xffffffffu, cs.Limit);
        var ds = r.DataSegment;
        Assert.True(ds.Db);
        Assert.Equal(0x3, ds.Type);
        var tss = r.TssSegment;
        Assert.False(tss.S);
        Assert.Equal(0xb, tss.Type);
        Assert.Equal(0x67u, tss.Limit);
    }

    [Fact]
    public void Pvh_writes_start_info_with_cmdline_initrd_and_memmap()
    {
        using var m = Mem.Create(128 * Mem.MiB);
        byte[] initrd = Enumerable.Range(0, 10000).Select(i => (byte)i).ToArray();
        var r = LinuxLoader.Load(m, Elf, new BootOptions { CommandLine = "x=1", Initrd = initrd, PreferPvh = true });
        Assert.Equal(BootEntryMode.Pvh32, r.Mode);
        Assert.Equal(ElfBuilder.KernelBase + 0x100, r.EntryPoint);
        Assert.Equal(0UL, r.PageTableBase);
        Assert.Equal((0x11UL, 0UL, 0UL), (r.Cr0, r.Cr4, r.Efer));
        ulong si = r.BootInfoAddress;
        Assert.Equal(LowMemory.PvhStartInfo, si);
        Assert.Equal(0x336ec578u, Mem.U32(m, si));
        Assert.Equal(1u, Mem.U32(m, si + 4));
        Assert.Equal(1u, Mem.U32(m, si + 12));
        ulong mod = Mem.U64(m, si + 16);
        Assert.Equal(LowMemory.CommandLine, Mem.U64(m, si + 24));
        Assert.Equal(0UL, Mem.U64(m, si + 32));
        Assert.Equal(r.InitrdAddress, Mem.U64(m, mod));
        Assert.Equal((ulong)initrd.Length, Mem.U64(m, mod + 8));
        Assert.Equal(initrd, Mem.Read(m, r.InitrdAddress, initrd.Length));
        ulong mm = Mem.U64(m, si + 40);
        uint n = Mem.U32(m, si + 48);
        Assert.Equal(3u, n);
        Assert.Equal(0x9fc00UL, Mem.U64(m, mm + 8));
        Assert.Equal(1u, Mem.U32(m, mm + 16));
        Assert.Equal(2u, Mem.U32(m, mm + 24 + 16));
        Assert.Equal(0x100000UL, Mem.U64(m, mm + 48));
        Assert.Equal((ushort)0x08, r.CodeSelector);
        Assert.False(r.CodeSegment.L);
        Assert.True(r.CodeSegment.Db);
        Assert.Equal((ushort)0x10, r.DataSelector);
        Assert.Equal((ushort)0x18, r.TssSelector);
        Assert.Equal(31, r.GdtLimit);
    }

    [Fact]
    public void Pvh_preference_falls_back_to_long64_without_note()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        var k = KernelImage.Parse(ElfBuilder.Simple(pvh: false), "k");
        Assert.Equal(BootEntryMode.Long64, LinuxLoader.Load(m, k, new BootOptions { PreferPvh = true }).Mode);
    }

    [Fact]
    public void Initrd_goes_high_page_aligned_below_the_limits()
    {
        using var m = Mem.Create(128 * Mem.MiB);
        byte[] initrd = new byte[3 * 1000 * 1000 + 7];
        initrd[^1] = 0x42;
        var r = LinuxLoader.Load(m, Elf, new BootOptions { Initrd = initrd });
        Assert.Equal(0UL, r.InitrdAddress % 4096);
        Assert.True(r.InitrdAddress + r.InitrdSize <= 128 * Mem.MiB);
        Assert.True(128 * Mem.MiB - (r.InitrdAddress + r.InitrdSize) < 4096);
        Assert.Equal(0x42, Mem.Read(m, r.InitrdAddress + r.InitrdSize - 1, 1)[0]);
        Assert.Equal((uint)r.InitrdAddress, Mem.U32(m, LowMemory.ZeroPage + 0x218));
        Assert.Equal((uint)initrd.Length, Mem.U32(m, LowMemory.ZeroPage + 0x21c));
    }

    [Fact]
    public void Initrd_respects_initrd_addr_max_and_the_mmio_hole()
    {
        // 5 GiB: low RAM ends at 3 GiB, the kernel says 0x7fffffff.
        var ranges = MemoryLayout.RamRanges(5UL << 30);
        using var m = GuestMemory.CreateForTesting(ranges);
        var r = LinuxLoader.Load(m, Elf, new BootOptions { Initrd = new byte[8192] });
        Assert.Equal(0x80000000UL - 8192, r.InitrdAddress);
    }

    [Fact]
    public void Initrd_that_does_not_fit_is_rejected()
    {
        using var m = Mem.Create(32 * Mem.MiB);
        var e = Assert.Throws<BootException>(() => LinuxLoader.Load(m, Elf, new BootOptions { Initrd = new byte[16 << 20] }));
        Assert.StartsWith("Memory (32 MiB) is too small for kernel + initrd", e.Message);
    }

    [Fact]
    public void Kernel_that_does_not_fit_is_rejected()
    {
        using var m = Mem.Create(16 * Mem.MiB); // segment at 16 MiB is outside RAM
        var e = Assert.Throws<BootException>(() => LinuxLoader.Load(m, Elf, new BootOptions()));
        Assert.StartsWith("Memory (16 MiB) is too small for the kernel", e.Message);
    }

    [Fact]
    public void Kernel_segment_below_1mib_is_rejected()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        var k = KernelImage.Parse(ElfBuilder.Build([new Seg(0x7000, new byte[16], 16)], 0x7000), "k");
        Assert.Contains("below 1 MiB", Assert.Throws<BootException>(() => LinuxLoader.Load(m, k, new BootOptions())).Message);
    }

    [Fact]
    public void Command_line_too_long_is_rejected()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        var e = Assert.Throws<BootException>(() => LinuxLoader.Load(m, Elf, new BootOptions { CommandLine = new string('a', 2048) }));
        Assert.Equal("Command line is 2048 bytes; this kernel accepts at most 2047.", e.Message);
        LinuxLoader.Load(m, Elf, new BootOptions { CommandLine = new string('a', 2047) });
        var bz = KernelImage.Parse(BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()), cmdlineSize: 255), "bz");
        e = Assert.Throws<BootException>(() => LinuxLoader.Load(m, bz, new BootOptions { CommandLine = new string('a', 256) }));
        Assert.Equal("Command line is 256 bytes; this kernel accepts at most 255.", e.Message);
    }

    [Fact]
    public void Command_line_with_nul_or_non_ascii_is_rejected()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        Assert.Throws<BootException>(() => LinuxLoader.Load(m, Elf, new BootOptions { CommandLine = "a\0b" }));
        Assert.Throws<BootException>(() => LinuxLoader.Load(m, Elf, new BootOptions { CommandLine = "é" }));
    }

    [Fact]
    public void Decompressed_bzImage_gets_the_kernel_setup_header_in_the_zero_page()
    {
        using var m = Mem.Create(128 * Mem.MiB);
        byte[] file = BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()));
        var k = KernelImage.Parse(file, "bz");
        var r = LinuxLoader.Load(m, k, new BootOptions { CommandLine = "quiet", Initrd = new byte[100] });
        Assert.Equal(BootEntryMode.Long64, r.Mode);
        Assert.Equal(ElfBuilder.KernelBase, r.EntryPoint);
        byte[] zp = Mem.Read(m, LowMemory.ZeroPage, 4096);
        // Header copied verbatim except the loader-owned fields.
        Assert.Equal(file.AsSpan(0x1f1, 0x210 - 0x1f1).ToArray(), zp.AsSpan(0x1f1, 0x210 - 0x1f1).ToArray());
        Assert.Equal(file.AsSpan(0x22c, 0x26c - 0x22c).ToArray(), zp.AsSpan(0x22c, 0x26c - 0x22c).ToArray());
        Assert.Equal(0xff, zp[0x210]);
        Assert.Equal(0x81, zp[0x211]);
        Assert.Equal((uint)LowMemory.CommandLine, BitConverter.ToUInt32(zp, 0x228));
        Assert.Equal((uint)r.InitrdAddress, BitConverter.ToUInt32(zp, 0x218));
        Assert.Equal(100u, BitConverter.ToUInt32(zp, 0x21c));
        Assert.All(zp[..0x1e8], b => Assert.Equal(0, b));
    }

    [Fact]
    public void Classic_bzImage_boot_loads_protected_mode_code_at_pref_address()
    {
        using var m = Mem.Create(128 * Mem.MiB);
        byte[] file = BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()), initSize: 0x800000);
        var k = KernelImage.Parse(file, "bz");
        var r = LinuxLoader.Load(m, k, new BootOptions { DecompressInVmm = false, PreferPvh = true });
        Assert.Equal(BootEntryMode.Long64, r.Mode);
        Assert.Equal(0x1000200UL, r.EntryPoint);
        Assert.Equal(0x1800000UL, r.KernelEnd);
        Assert.Equal(file.AsSpan(k.SetupSize).ToArray(), Mem.Read(m, 0x1000000, file.Length - k.SetupSize));
    }

    [Fact]
    public void Classic_boot_aligns_a_relocatable_kernel()
    {
        using var m = Mem.Create(128 * Mem.MiB);
        var k = KernelImage.Parse(BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()), prefAddress: 0x1234567), "bz");
        var r = LinuxLoader.Load(m, k, new BootOptions { DecompressInVmm = false });
        Assert.Equal(0x1400000UL + 0x200, r.EntryPoint); // aligned up to kernel_alignment 2 MiB
    }

    [Fact]
    public void Classic_boot_needs_a_64_bit_entry()
    {
        using var m = Mem.Create(128 * Mem.MiB);
        var k = KernelImage.Parse(BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()), xloadflags: 0), "bz");
        Assert.Contains("XLF_KERNEL_64", Assert.Throws<BootException>(() => LinuxLoader.Load(m, k, new BootOptions { DecompressInVmm = false })).Message);
        k = KernelImage.Parse(BzImageBuilder.Build(BzImageBuilder.Gzip(ElfBuilder.Simple()), version: 0x020a), "bz");
        Assert.Contains("2.10", Assert.Throws<BootException>(() => LinuxLoader.Load(m, k, new BootOptions { DecompressInVmm = false })).Message);
    }

    [Fact]
    public void Lzo_kernel_can_still_boot_classically_but_not_decompressed()
    {
        using var m = Mem.Create(128 * Mem.MiB);
        byte[] payload = [0x89, 0x4c, 0x5a, 0x4f, 0, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3, 4, 5, 6, 7];
        var k = KernelImage.Parse(BzImageBuilder.Build(payload), "bz");
        Assert.Contains("lzo", Assert.Throws<BootException>(() => LinuxLoader.Load(m, k, new BootOptions())).Message);
        Assert.Equal(0x1000200UL, LinuxLoader.Load(m, k, new BootOptions { DecompressInVmm = false }).EntryPoint);
    }

    [Fact]
    public void Mp_table_is_written_for_the_cpu_count()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        LinuxLoader.Load(m, Elf, new BootOptions { CpuCount = 4 });
        Assert.Equal("_MP_", Encoding.ASCII.GetString(Mem.Read(m, LowMemory.MpTable, 4)));
        Assert.Throws<BootException>(() => LinuxLoader.Load(m, Elf, new BootOptions { CpuCount = 0 }));
        Assert.Throws<BootException>(() => LinuxLoader.Load(m, Elf, new BootOptions { CpuCount = 255 }));
    }

    [Fact]
    public void Acpi_rsdp_is_passed_in_both_modes()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        LinuxLoader.Load(m, Elf, new BootOptions { AcpiRsdpAddress = 0xE0000 });
        Assert.Equal(0xE0000UL, Mem.U64(m, LowMemory.ZeroPage + 0x70));
        var r = LinuxLoader.Load(m, Elf, new BootOptions { AcpiRsdpAddress = 0xE0000, PreferPvh = true });
        Assert.Equal(0xE0000UL, Mem.U64(m, r.BootInfoAddress + 32));
    }

    [Fact]
    public void Mp_table_can_be_left_out()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        LinuxLoader.Load(m, Elf, new BootOptions { CpuCount = 2, WriteMpTable = false });
        Assert.All(Mem.Read(m, LowMemory.MpTable, 16), b => Assert.Equal(0, b));
    }

    [Fact]
    public void Elf_zero_page_reports_the_command_line_limit()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        LinuxLoader.Load(m, Elf, new BootOptions());
        Assert.Equal(2047u, Mem.U32(m, LowMemory.ZeroPage + 0x238));
        Assert.Equal(0x7fffffffu, Mem.U32(m, LowMemory.ZeroPage + 0x22c));
    }

    [Fact]
    public void Memory_below_one_mib_is_rejected()
    {
        using var m = GuestMemory.CreateForTesting([(new GuestAddress(0), 0x80000)]);
        Assert.Throws<BootException>(() => LinuxLoader.Load(m, Elf, new BootOptions()));
    }
}
