using System.Buffers.Binary;
using System.Text;
using KvmSharp.Boot.Acpi;
using Xunit;

namespace KvmSharp.Boot.Tests.Acpi;

public class AcpiTablesTests
{
    private static byte Sum(ReadOnlySpan<byte> s)
    {
        byte x = 0;
        foreach (byte b in s)
            x += b;
        return x;
    }

    private static uint U32(ReadOnlySpan<byte> b, int o) => BinaryPrimitives.ReadUInt32LittleEndian(b[o..]);
    private static ulong U64(ReadOnlySpan<byte> b, int o) => BinaryPrimitives.ReadUInt64LittleEndian(b[o..]);
    private static ushort U16(ReadOnlySpan<byte> b, int o) => BinaryPrimitives.ReadUInt16LittleEndian(b[o..]);

    /// <summary>Reads a table from guest memory by following its header's length.</summary>
    private static byte[] ReadTable(KvmSharp.Memory.GuestMemory m, ulong addr, string signature)
    {
        byte[] hdr = Mem.Read(m, addr, 36);
        Assert.Equal(signature, Encoding.ASCII.GetString(hdr, 0, 4));
        return Mem.Read(m, addr, (int)U32(hdr, 4));
    }

    [Theory]
    [InlineData(1, 256UL << 20)]
    [InlineData(2, 3UL << 30)]
    [InlineData(64, 8UL << 30)]
    [InlineData(254, 1UL << 30)]
    public void Guest_follows_the_pointers_from_the_RSDP_and_every_checksum_holds(int cpus, ulong ram)
    {
        using var m = Mem.Create(Math.Min(ram, 256 * Mem.MiB));
        ulong rsdpAddr = AcpiTables.Write(m, new AcpiConfig(cpus, ram));
        Assert.Equal(0xE0000UL, rsdpAddr);
        Assert.Equal(0UL, rsdpAddr % 16);

        byte[] rsdp = Mem.Read(m, rsdpAddr, 36);
        Assert.Equal("RSD PTR ", Encoding.ASCII.GetString(rsdp, 0, 8));
        Assert.Equal(0, Sum(rsdp.AsSpan(0, 20)));   // ACPI 1.0 checksum
        Assert.Equal(0, Sum(rsdp));                  // extended checksum
        Assert.Equal("KVMSHP", Encoding.ASCII.GetString(rsdp, 9, 6));
        Assert.Equal(2, rsdp[15]);
        Assert.Equal(36u, U32(rsdp, 20));
        Assert.Equal(0u, U32(rsdp, 16));             // no RSDT

        byte[] xsdt = ReadTable(m, U64(rsdp, 24), "XSDT");
        var seen = new List<string>();
        ulong end = 0;
        var all = new List<(ulong Addr, byte[] T)> { (U64(rsdp, 24), xsdt) };
        for (int o = 36; o < xsdt.Length; o += 8)
        {
            ulong a = U64(xsdt, o);
            byte[] t = Mem.Read(m, a, 36);
            string sig = Encoding.ASCII.GetString(t, 0, 4);
            seen.Add(sig);
            all.Add((a, ReadTable(m, a, sig)));
        }
        Assert.Equal(["FACP", "APIC", "MCFG"], seen);
        byte[] fadt = all[1].T;
        ulong dsdtAddr = U64(fadt, 140);
        Assert.Equal(dsdtAddr, U32(fadt, 40));
        all.Add((dsdtAddr, ReadTable(m, dsdtAddr, "DSDT")));

        foreach (var (addr, t) in all)
        {
            Assert.Equal(0, Sum(t));
            Assert.Equal("KVMSHP", Encoding.ASCII.GetString(t, 10, 6));
            Assert.Equal("KVMSHARP", Encoding.ASCII.GetString(t, 16, 8));
            Assert.Equal(0UL, addr % 16);
            Assert.True(addr >= 0xE0000 && addr + (ulong)t.Length <= 0x100000);
            end = Math.Max(end, addr + (ulong)t.Length);
        }
        // Tables do not overlap.
        var sorted = all.OrderBy(x => x.Addr).ToList();
        for (int i = 1; i < sorted.Count; i++)
            Assert.True(sorted[i - 1].Addr + (ulong)sorted[i - 1].T.Length <= sorted[i].Addr);

        ulong facs = U32(fadt, 36);
        Assert.Equal(0UL, facs % 64);
        byte[] f = Mem.Read(m, facs, 64);
        Assert.Equal("FACS", Encoding.ASCII.GetString(f, 0, 4));
        Assert.Equal(64u, U32(f, 4));
    }

    [Fact]
    public void Fadt_describes_the_PM_block_reset_register_and_legacy_devices()
    {
        var set = AcpiTables.Build(new AcpiConfig(1, 512 * Mem.MiB));
        var f = set.Get("FACP");
        Assert.Equal(276, f.Length);
        Assert.Equal(6, f[8]);                               // revision 6
        Assert.Equal(9, U16(f, 46));                         // SCI_INT
        Assert.Equal(0u, U32(f, 48));                        // SMI_CMD: ACPI always on
        Assert.Equal(0x600u, U32(f, 56));                    // PM1a_EVT_BLK
        Assert.Equal(0x604u, U32(f, 64));                    // PM1a_CNT_BLK
        Assert.Equal(0u, U32(f, 76));                        // no PM timer
        Assert.Equal(4, f[88]);
        Assert.Equal(2, f[89]);
        Assert.Equal(0, f[91]);
        Assert.Equal(0x32, f[108]);                          // CENTURY
        ushort bootArch = U16(f, 109);
        Assert.Equal(0x7, bootArch);                         // legacy devices, 8042, no VGA
        uint flags = U32(f, 112);
        Assert.NotEqual(0u, flags & (1 << 10));              // RESET_REG_SUP
        Assert.Equal(0u, flags & (1 << 20));                 // not hardware-reduced
        Assert.NotEqual(0u, flags & (1 << 4));               // no fixed power button
        Assert.NotEqual(0u, flags & (1 << 5));               // no fixed sleep button
        // RESET_REG: system I/O, 8 bits, byte access, 0xCF9; value 6.
        Assert.Equal([1, 8, 0, 1], f.Slice(116, 4).ToArray());
        Assert.Equal(0xCF9UL, U64(f, 120));
        Assert.Equal(6, f[128]);
        // X_PM1a_EVT_BLK / X_PM1a_CNT_BLK agree with the 32-bit blocks and lengths.
        Assert.Equal([1, 32, 0, 2], f.Slice(148, 4).ToArray());
        Assert.Equal(0x600UL, U64(f, 152));
        Assert.Equal([1, 16, 0, 2], f.Slice(172, 4).ToArray());
        Assert.Equal(0x604UL, U64(f, 176));
        Assert.Equal(set.Tables.Single(t => t.Signature == "DSDT").Address, U64(f, 140));
    }

    private sealed record Madt(List<(byte Uid, byte ApicId, uint Flags)> Cpus, List<(byte Id, uint Address, uint GsiBase)> IoApics,
        List<(byte Bus, byte Source, uint Gsi, ushort Flags)> Overrides, List<(byte Uid, ushort Flags, byte Lint)> Nmis);

    private static Madt ParseMadt(ReadOnlySpan<byte> t)
    {
        var m = new Madt([], [], [], []);
        int p = 44;
        while (p < t.Length)
        {
            byte type = t[p], len = t[p + 1];
            Assert.True(len >= 2 && p + len <= t.Length);
            switch (type)
            {
                case 0:
                    Assert.Equal(8, len);
                    m.Cpus.Add((t[p + 2], t[p + 3], U32(t, p + 4)));
                    break;
                case 1:
                    Assert.Equal(12, len);
                    m.IoApics.Add((t[p + 2], U32(t, p + 4), U32(t, p + 8)));
                    break;
                case 2:
                    Assert.Equal(10, len);
                    m.Overrides.Add((t[p + 2], t[p + 3], U32(t, p + 4), U16(t, p + 8)));
                    break;
                case 4:
                    Assert.Equal(6, len);
                    m.Nmis.Add((t[p + 2], U16(t, p + 3), t[p + 5]));
                    break;
                default:
                    Assert.Fail($"unexpected MADT entry type {type}");
                    break;
            }
            p += len;
        }
        Assert.Equal(t.Length, p);
        return m;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(64)]
    [InlineData(254)]
    public void Madt_lists_every_cpu_the_ioapic_the_sci_override_and_the_nmi(int cpus)
    {
        var t = AcpiTables.Build(new AcpiConfig(cpus, 1UL << 30)).Get("APIC");
        Assert.Equal(0xFEE00000u, U32(t, 36));
        Assert.Equal(1u, U32(t, 40));                        // PCAT_COMPAT
        var m = ParseMadt(t);
        Assert.Equal(cpus, m.Cpus.Count);
        for (int i = 0; i < cpus; i++)
            Assert.Equal(((byte)i, (byte)i, 1u), m.Cpus[i]);
        Assert.Equal([((byte)0, 0xFEC00000u, 0u)], m.IoApics);
        // Only the SCI is overridden: IRQ 0 stays on GSI 0, where KVM's default routing puts the PIT.
        Assert.Equal([((byte)0, (byte)9, 9u, (ushort)0x000D)], m.Overrides);
        Assert.Equal([((byte)0xFF, (ushort)0, (byte)1)], m.Nmis);
    }

    [Fact]
    public void Mcfg_has_one_allocation_for_bus_0()
    {
        var t = AcpiTables.Build(new AcpiConfig(1, 1UL << 30)).Get("MCFG");
        Assert.Equal(60, t.Length);
        Assert.Equal(0xE0000000UL, U64(t, 44));
        Assert.Equal(0, U16(t, 52));
        Assert.Equal(0, t[54]);
        Assert.Equal(0, t[55]);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(-1)]
    [InlineData(255)]
    public void Out_of_range_cpu_counts_are_refused(int cpus)
    {
        var e = Assert.Throws<BootException>(() => AcpiTables.Build(new AcpiConfig(cpus, 1UL << 30)));
        Assert.Contains("CPU count", e.Message);
    }

    [Fact]
    public void Write_refuses_memory_that_does_not_cover_the_bios_area()
    {
        using var m = KvmSharp.Memory.GuestMemory.CreateForTesting([(new KvmSharp.Memory.GuestAddress(0), 0x80000UL)]);
        Assert.Throws<BootException>(() => AcpiTables.Write(m, new AcpiConfig(1, 0x80000)));
    }

    [Theory]
    [InlineData(512UL << 20, 64UL << 30)]
    [InlineData(3UL << 30, 64UL << 30)]
    [InlineData(63UL << 30, 64UL << 30)]          // RAM ends at 4 + 60 = 64 GiB
    [InlineData(64UL << 30, 65UL << 30)]          // RAM ends at 65 GiB
    [InlineData((64UL << 30) + 4096, 66UL << 30)] // rounded up to 1 GiB
    public void Pci64_window_starts_above_ram_and_at_least_at_64GiB(ulong ram, ulong expected)
    {
        Assert.Equal(expected, PlatformLayout.Pci64WindowStart(ram));
    }

    [Fact]
    public void Pci_intx_swizzle_covers_ioapic_pins_16_to_23()
    {
        Assert.Equal(16, PlatformLayout.PciIntxGsi(0, 0));
        Assert.Equal(17, PlatformLayout.PciIntxGsi(1, 0));
        Assert.Equal(20, PlatformLayout.PciIntxGsi(1, 3));
        Assert.Equal(16, PlatformLayout.PciIntxGsi(7, 1));
        Assert.Equal(23, PlatformLayout.PciIntxGsi(31, 0));
        for (int s = 0; s < 32; s++)
        {
            for (int p = 0; p < 4; p++)
                Assert.InRange(PlatformLayout.PciIntxGsi(s, p), 16, PlatformLayout.IoApicPins - 1);
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => PlatformLayout.PciIntxGsi(32, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => PlatformLayout.PciIntxGsi(0, 4));
    }

    [Fact]
    public void Layout_ranges_do_not_overlap()
    {
        Assert.Equal(PlatformLayout.MmioHoleStart, PlatformLayout.Pci32WindowStart);
        Assert.Equal(PlatformLayout.EcamBase, PlatformLayout.Pci32WindowStart + PlatformLayout.Pci32WindowSize);
        Assert.True(PlatformLayout.EcamBase + PlatformLayout.EcamSize <= PlatformLayout.IoApicAddress);
        Assert.True(PlatformLayout.IoApicAddress + 0x1000 <= PlatformLayout.LocalApicAddress);
        Assert.Equal(PlatformLayout.Pm1aEventBlock + PlatformLayout.Pm1EventLength, (int)PlatformLayout.Pm1aControlBlock);
        Assert.True(PlatformLayout.Pm1aControlBlock + PlatformLayout.Pm1ControlLength <= PlatformLayout.Pm1aEventBlock + PlatformLayout.AcpiPmPortCount);
        // The ACPI area lies in the e820-reserved legacy hole.
        var map = E820.Build(KvmSharp.Memory.MemoryLayout.RamRanges(64 * Mem.MiB));
        Assert.Contains(map, e => e.Type == E820Type.Reserved && e.Address <= PlatformLayout.AcpiAreaStart && e.End >= PlatformLayout.AcpiAreaEnd);
    }

    [Fact]
    public void Dsdt_devices_can_be_left_out()
    {
        var full = AcpiTables.BuildDsdtAml(new AcpiConfig(1, 1UL << 30));
        var bare = AcpiTables.BuildDsdtAml(new AcpiConfig(1, 1UL << 30) { Com1 = false, Keyboard = false, Rtc = false });
        Assert.True(bare.Length < full.Length);
        string s = Encoding.ASCII.GetString(bare);
        Assert.DoesNotContain("COM1", s);
        Assert.DoesNotContain("KBD_", s);
        Assert.DoesNotContain("RTC_", s);
        Assert.Contains("PCI0", s);
        Assert.Contains("MBRD", s);
    }

    [Fact]
    public void Largest_configuration_fits_in_the_bios_area()
    {
        var set = AcpiTables.Build(new AcpiConfig(AcpiTables.MaxCpus, 1UL << 40));
        Assert.True(set.BaseAddress + (ulong)set.Image.Length <= PlatformLayout.AcpiAreaEnd);
    }
}
