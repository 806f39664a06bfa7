using System.Buffers.Binary;
using KvmSharp.Boot;
using KvmSharp.Boot.Acpi;
using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;
using KvmSharp.Vmm.Platform;
using Xunit;

namespace KvmSharp.Vmm.Tests;

/// <summary>
/// What the guest is told (DSDT, FADT, MADT, MCFG, MP table, virtio-mmio command line, all built
/// from <see cref="PlatformLayout"/>) matches what the <see cref="DeviceManager"/> wires: each
/// described port range is claimed on the bus by the device it names, on the interrupt it names.
/// </summary>
public sealed class MachineLayoutTests : IDisposable
{
    private const ulong Ram = 64 << 20;
    private readonly GuestMemory _memory = GuestMemory.CreateAnonymous(MemoryLayout.RamRanges(Ram));
    private readonly FakeInterrupts _irqs = new();
    private readonly List<VmExit> _stops = [];
    private readonly DeviceManager _dm;
    private readonly AcpiTableSet _acpi = AcpiTables.Build(new AcpiConfig(2, Ram));

    public MachineLayoutTests()
    {
        _dm = new DeviceManager(_memory, _irqs, _stops.Add, vmFd: null, eventLoop: () => throw new InvalidOperationException("no I/O thread in unit tests"), TextWriter.Null);
        _dm.AddLegacyDevices(Stream.Null, Ram, debugExit: true);
        _dm.AddAcpiPlatform();
        _dm.AddVirtio(new VirtioRng(), mmio: false);
        _dm.AddVirtio(new VirtioRng(), mmio: true);
        _dm.AddVirtio(new VirtioRng(), mmio: true);
    }

    public void Dispose()
    {
        _dm.Dispose();
        _memory.Dispose();
    }

    private DeviceInfo Placed(string name) => Assert.Single(_dm.Devices, d => d.Name == name);

    private static byte[] Descriptor(ResourceTemplate t)
    {
        byte[] b = t.ToArray();
        return b[..^2]; // without the end tag
    }

    private static bool Contains(ReadOnlySpan<byte> haystack, ReadOnlySpan<byte> needle) => haystack.IndexOf(needle) >= 0;

    [Theory]
    [InlineData("com1")]
    [InlineData("rtc")]
    [InlineData("i8042-data")]
    [InlineData("i8042-command")]
    [InlineData("acpi-pm")]
    [InlineData("pci-config")]
    public void EveryWiredPortRangeIsDescribedInTheDsdt(string name)
    {
        var d = Placed(name);
        Assert.Equal(BusKind.Pio, d.Bus);
        var io = Descriptor(new ResourceTemplate().Io((ushort)d.Base, (ushort)d.Base, 1, (byte)d.Length));
        Assert.True(Contains(_acpi.Get("DSDT"), io), $"{name} at 0x{d.Base:x}+{d.Length} is not in the DSDT");
        Assert.True(_dm.PioBus.TryRead(d.Base, new byte[1]), "the bus claims the first port");
        Assert.True(_dm.PioBus.TryRead(d.Base + d.Length - 1, new byte[1]), "the bus claims the last port");
    }

    [Fact]
    public void Com1IsDescribedWithTheIrqItsLineRaises()
    {
        var com1 = Placed("com1");
        var line = Assert.Single(_irqs.Edges, l => l.Gsi < PlatformLayout.IsaIrqCount && l.Gsi == com1.Gsi);
        var crs = new ResourceTemplate().Io((ushort)com1.Base, (ushort)com1.Base, 1, (byte)com1.Length).IrqNoFlags((int)line.Gsi);
        Assert.True(Contains(_acpi.Get("DSDT"), Descriptor(crs)));
        Assert.True(IsaIrqIsIdentityInMpTable(line.Gsi));
    }

    [Fact]
    public void FadtPointsAtTheWiredPmBlockAndResetRegister()
    {
        var fadt = _acpi.Get("FACP");
        var pm = Placed("acpi-pm");
        Assert.Equal(pm.Base, BinaryPrimitives.ReadUInt32LittleEndian(fadt[56..]));     // PM1a_EVT_BLK
        uint cnt = BinaryPrimitives.ReadUInt32LittleEndian(fadt[64..]);                 // PM1a_CNT_BLK
        Assert.InRange(cnt, pm.Base, pm.Base + pm.Length - 2);
        // SLP_TYP = the \_S5 value, SLP_EN: the wired device powers off.
        ushort s5 = (ushort)((PlatformLayout.S5SleepType << 10) | (1 << 13));
        Assert.True(_dm.PioBus.TryWrite(cnt, [(byte)s5, (byte)(s5 >> 8)]));
        Assert.Equal(VmExitKind.GuestPowerOff, Assert.Single(_stops).Kind);

        ulong resetPort = BinaryPrimitives.ReadUInt64LittleEndian(fadt[120..]);           // RESET_REG.Address
        byte resetValue = fadt[128];
        Assert.True(_dm.PioBus.TryWrite(resetPort, [resetValue]));
        Assert.Equal(VmExitKind.GuestReboot, _stops[^1].Kind);
    }

    [Fact]
    public void McfgPointsAtTheWiredEcam()
    {
        var mcfg = _acpi.Get("MCFG");
        var ecam = Placed("ecam");
        Assert.Equal(ecam.Base, BinaryPrimitives.ReadUInt64LittleEndian(mcfg[44..]));
        Assert.Equal(BusKind.Mmio, ecam.Bus);
        // The host bridge answers at 00:00.0 through it: vendor id is not 0xFFFF.
        var id = new byte[4];
        Assert.True(_dm.MmioBus.TryRead(ecam.Base, id));
        Assert.NotEqual(0xFFFFu, BinaryPrimitives.ReadUInt32LittleEndian(id) & 0xFFFF);
    }

    [Fact]
    public void MadtAndMpTableAgreeOnTheIoApic()
    {
        var madt = _acpi.Get("APIC");
        int ioApic = madt.IndexOf([(byte)1, (byte)12]); // type 1, length 12
        Assert.True(ioApic > 44);
        Assert.Equal(PlatformLayout.IoApicAddress, BinaryPrimitives.ReadUInt32LittleEndian(madt[(ioApic + 4)..]));
        Assert.Equal(PlatformLayout.IoApicAddress, MpIoApicAddress());
    }

    [Fact]
    public void VirtioPciIntxIsTheGsiThePrtNames()
    {
        var dev = Assert.Single(_dm.Devices, d => d.Name.StartsWith("virtio-pci@", StringComparison.Ordinal));
        int slot = Convert.ToInt32(dev.Name["virtio-pci@00:".Length..^2], 16);
        var line = Assert.Single(_irqs.Levels);
        Assert.Equal((uint)PlatformLayout.PciIntxGsi(slot, 0), line.Gsi);
        Assert.Equal(line.Gsi, dev.Gsi);
        Assert.InRange(dev.Base, PlatformLayout.Pci32WindowStart, PlatformLayout.Pci32WindowStart + PlatformLayout.Pci32WindowSize - 1);
    }

    [Fact]
    public void VirtioMmioCommandLineNamesTheWiredSlotsAndIrqs()
    {
        var mmio = _dm.Devices.Where(d => d.Name.StartsWith("virtio-mmio@", StringComparison.Ordinal)).ToList();
        Assert.Equal(2, mmio.Count);
        string cmdline = _dm.MmioCommandLine;
        foreach (var d in mmio)
        {
            Assert.Contains($" virtio_mmio.device=4K@0x{d.Base:x}:{d.Gsi}", cmdline, StringComparison.Ordinal);
            Assert.Equal(VirtioMmioTransport.RegionSize, d.Length);
            Assert.Contains(_irqs.Edges, l => l.Gsi == d.Gsi);
            Assert.True(d.Gsi < PlatformLayout.IsaIrqCount && IsaIrqIsIdentityInMpTable(d.Gsi!.Value));
            Assert.True(_dm.MmioBus.TryRead(d.Base, new byte[4]));
        }
        Assert.Equal(PlatformLayout.VirtioMmioSlotSize, VirtioMmioTransport.RegionSize);
    }

    [Fact]
    public void NoTwoDevicesShareAnInterrupt()
    {
        var gsis = _dm.Devices.Where(d => d.Gsi is not null).Select(d => d.Gsi!.Value).ToList();
        Assert.Equal(gsis.Count, gsis.Distinct().Count());
        Assert.DoesNotContain((uint)PlatformLayout.SciIrq, gsis);
    }

    private byte[] MpTableBytes()
    {
        using var m = GuestMemory.CreateAnonymous(MemoryLayout.RamRanges(Ram));
        MpTable.Write(m, 2);
        var b = new byte[MpTable.Size(2)];
        Assert.True(m.TryRead(new GuestAddress(LowMemory.MpTable), b));
        return b;
    }

    /// <summary>Walks the MP configuration table's entries (MP spec 1.4 §4.3).</summary>
    private IEnumerable<byte[]> MpEntries()
    {
        byte[] t = MpTableBytes();
        int p = 16 + 44;
        int count = BinaryPrimitives.ReadUInt16LittleEndian(t.AsSpan(16 + 34));
        for (int i = 0; i < count; i++)
        {
            int len = t[p] == 0 ? 20 : 8;
            yield return t[p..(p + len)];
            p += len;
        }
    }

    private bool IsaIrqIsIdentityInMpTable(uint irq) =>
        MpEntries().Any(e => e[0] == 3 && e[4] == 0 && e[5] == irq && e[7] == irq); // I/O interrupt, ISA bus 0, IRQ → INTIN#

    private ulong MpIoApicAddress() => BinaryPrimitives.ReadUInt32LittleEndian(MpEntries().Single(e => e[0] == 2).AsSpan(4));
}
