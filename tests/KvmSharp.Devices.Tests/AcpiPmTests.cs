using System.Buffers.Binary;

namespace KvmSharp.Devices.Tests;

public class AcpiPmTests
{
    // Any base works for the device; these are the platform's (PlatformLayout).
    private const ushort Base = 0x600;
    private const ushort Cnt = Base + AcpiPm.ControlOffset;

    private static (Bus Bus, AcpiPm Pm, Func<int> Offs) Create()
    {
        int offs = 0;
        var pm = new AcpiPm(() => offs++);
        var bus = new Bus();
        bus.Insert(pm, Base, AcpiPm.PortCount);
        return (bus, pm, () => offs);
    }

    private static ushort In16(Bus bus, ushort port)
    {
        Span<byte> b = stackalloc byte[2];
        Assert.True(bus.TryRead(port, b));
        return BinaryPrimitives.ReadUInt16LittleEndian(b);
    }

    private static void Out16(Bus bus, ushort port, ushort v)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, v);
        Assert.True(bus.TryWrite(port, b));
    }

    [Fact]
    public void Sci_en_reads_1_so_acpica_sees_acpi_mode()
    {
        var (bus, _, _) = Create();
        Assert.Equal(1, In16(bus, Cnt) & 1);
        Out16(bus, Cnt, 0);                      // clearing SCI_EN is not possible
        Assert.Equal(1, In16(bus, Cnt) & 1);
    }

    [Fact]
    public void Acpica_s5_sequence_powers_off_once()
    {
        // acpi_hw_legacy_sleep: write SLP_TYP without SLP_EN, then SLP_TYP | SLP_EN (16-bit outw).
        var (bus, _, offs) = Create();
        ushort cnt = In16(bus, Cnt);
        Out16(bus, Cnt, (ushort)(cnt | (5 << 10)));
        Assert.Equal(0, offs());
        Assert.Equal(5 << 10, In16(bus, Cnt) & (7 << 10)); // SLP_TYP reads back
        Out16(bus, Cnt, (ushort)(cnt | (5 << 10) | (1 << 13)));
        Assert.Equal(1, offs());
        Assert.Equal(0, In16(bus, Cnt) & (1 << 13));       // SLP_EN reads 0
    }

    [Fact]
    public void Byte_write_of_the_high_control_byte_powers_off()
    {
        var (bus, _, offs) = Create();
        Assert.True(bus.TryWrite(Cnt + 1, [(byte)((5 << 2) | (1 << 5))]));
        Assert.Equal(1, offs());
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(7)]
    public void Other_sleep_types_are_ignored_and_counted(int slpTyp)
    {
        var (bus, pm, offs) = Create();
        Out16(bus, Cnt, (ushort)((slpTyp << 10) | (1 << 13) | 1));
        Assert.Equal(0, offs());
        Assert.Equal(1, pm.IgnoredSleepRequests);
    }

    [Fact]
    public void Status_is_write_one_to_clear_and_enable_is_read_write()
    {
        var (bus, _, _) = Create();
        Assert.Equal(0, In16(bus, Base));
        Out16(bus, Base, 0xFFFF);  // clears nothing, sets nothing
        Assert.Equal(0, In16(bus, Base));
        Out16(bus, Base + AcpiPm.EnableOffset, 0x0121);
        Assert.Equal(0x0121, In16(bus, Base + AcpiPm.EnableOffset));
        // A 32-bit access covers status and enable (the FADT's 4-byte PM1 event block).
        Span<byte> b = stackalloc byte[4];
        Assert.True(bus.TryRead(Base, b));
        Assert.Equal(0x0121_0000u, BinaryPrimitives.ReadUInt32LittleEndian(b));
        Assert.True(bus.TryWrite(Base, [0xFF, 0xFF, 0x00, 0x01]));
        Assert.Equal(0x0100, In16(bus, Base + AcpiPm.EnableOffset));
    }

    [Fact]
    public void Reserved_ports_read_zero_and_ignore_writes()
    {
        var (bus, _, offs) = Create();
        Assert.True(bus.TryWrite(Base + 6, [0xFF, 0xFF]));
        Assert.Equal(0, In16(bus, Base + 6));
        Assert.Equal(0, offs());
    }

    [Fact]
    public void Null_callback_is_refused()
    {
        Assert.Throws<ArgumentNullException>(() => new AcpiPm(null!));
        Assert.Throws<ArgumentNullException>(() => new ResetControl(null!));
    }
}

public class ResetControlTests
{
    private const ushort ResetPort = 0xCF9; // the platform's (PlatformLayout.ResetRegisterPort)

    [Fact]
    public void Rst_cpu_resets_and_sys_rst_alone_does_not()
    {
        int resets = 0;
        var bus = new Bus();
        bus.Insert(new ResetControl(() => resets++), ResetPort, 1);
        // Linux reboot=pci: read, write cf9 | 2, then cf9 | 6 (warm) or cf9 | 0xE (cold).
        Span<byte> b = [0xFF];
        Assert.True(bus.TryRead(ResetPort, b));
        Assert.Equal(0, b[0]);
        Assert.True(bus.TryWrite(ResetPort, [0x02]));
        Assert.Equal(0, resets);
        Assert.True(bus.TryRead(ResetPort, b));
        Assert.Equal(0x02, b[0]);
        Assert.True(bus.TryWrite(ResetPort, [0x06]));   // ACPI RESET_VALUE
        Assert.Equal(1, resets);
        Assert.True(bus.TryWrite(ResetPort, [0x0E]));
        Assert.Equal(2, resets);
        Assert.True(bus.TryRead(ResetPort, b));
        Assert.Equal(0x0A, b[0]);                                // RST_CPU reads 0
    }

    [Fact]
    public void Shared_with_pci_config_ports_only_byte_accesses_at_cf9_are_taken()
    {
        int resets = 0;
        var pci = new RecordingDevice(0x40);
        var bus = new Bus();
        bus.Insert(new ResetControl(() => resets++).CombineWithPciConfigIo(pci), 0xCF8, 8);

        Assert.True(bus.TryWrite(0xCF8, [0x00, 0x00, 0x00, 0x80]));   // CONFIG_ADDRESS (dword)
        Assert.Equal(1, pci.Writes);
        Assert.Equal(0UL, pci.LastOffset);
        Assert.True(bus.TryWrite(0xCF9, [0x06]));                     // reset control (byte)
        Assert.Equal(1, resets);
        Assert.Equal(1, pci.Writes);
        Assert.True(bus.TryWrite(0xCFD, [0x12]));                     // CONFIG_DATA byte 1
        Assert.Equal(2, pci.Writes);
        Assert.Equal(5UL, pci.LastOffset);

        Span<byte> d = stackalloc byte[4];
        Assert.True(bus.TryRead(0xCF8, d));
        Assert.Equal(1, pci.Reads);
        Span<byte> one = [0xFF];
        Assert.True(bus.TryRead(0xCF9, one));
        Assert.Equal(0x02, one[0]);
        Assert.Equal(1, pci.Reads);
    }
}
