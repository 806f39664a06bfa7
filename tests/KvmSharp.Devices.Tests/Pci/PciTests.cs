using System.Buffers.Binary;
using KvmSharp.Devices.Pci;

namespace KvmSharp.Devices.Tests.Pci;

internal sealed class FakePciDevice : IPciDevice
{
    public readonly RecordingDevice Bar0 = new(0x10);
    public readonly RecordingDevice Bar2 = new(0x20);
    public readonly RecordingDevice Bar4 = new(0x40);
    public readonly List<(int Offset, int Length)> Writes = [];

    public FakePciDevice(ulong bar0 = 0xE000_0000, ulong bar2 = 0x1_0000_0000, ushort bar4 = 0xC000)
    {
        Config = new PciConfigSpace(0x1AF4, 0x1044, 0x00_FF_00, revision: 1, subsystemVendorId: 0x1AF4, subsystemId: 0x40);
        Config.AddBar(0, PciBarKind.Memory32, 0x1000, bar0, Bar0);
        Config.AddBar(2, PciBarKind.Memory64, 0x4000, bar2, Bar2, prefetchable: true);
        Config.AddBar(4, PciBarKind.Io, 0x20, bar4, Bar4);
        Config.SetInterrupt(1, 10);
    }

    public PciConfigSpace Config { get; }

    public void ConfigWritten(int offset, int length) => Writes.Add((offset, length));

    public void ConfigReading(int offset, int length)
    {
    }
}

internal sealed class RecordingObserver : IPciBarObserver
{
    public readonly List<string> Events = [];

    public void BarMapped(IPciDevice device, PciBar bar, ulong address) => Events.Add($"map {bar.Index} 0x{address:x}");

    public void BarUnmapped(IPciDevice device, PciBar bar, ulong address) => Events.Add($"unmap {bar.Index} 0x{address:x}");
}

public class PciTests
{
    private const int PCI_VENDOR_ID = 0x00, PCI_COMMAND = 0x04, PCI_STATUS = 0x06, PCI_CLASS_REVISION = 0x08,
        PCI_HEADER_TYPE = 0x0e, PCI_BASE_ADDRESS_0 = 0x10, PCI_BASE_ADDRESS_2 = 0x18, PCI_BASE_ADDRESS_3 = 0x1c,
        PCI_BASE_ADDRESS_4 = 0x20, PCI_SUBSYSTEM_VENDOR_ID = 0x2c, PCI_ROM_ADDRESS = 0x30, PCI_CAPABILITY_LIST = 0x34,
        PCI_INTERRUPT_LINE = 0x3c, PCI_INTERRUPT_PIN = 0x3d;
    private const ushort PCI_COMMAND_IO = 1, PCI_COMMAND_MEMORY = 2, PCI_COMMAND_MASTER = 4;

    private readonly Bus _mmio = new();
    private readonly Bus _pio = new();
    private readonly RecordingObserver _observer = new();
    private readonly PciRoot _root;

    public PciTests()
    {
        _root = new PciRoot(_mmio, _pio, _observer);
        _pio.Insert(_root.ConfigIo, 0xCF8, PciRoot.ConfigIoLength);
        _mmio.Insert(_root.Ecam, 0xB000_0000, PciRoot.EcamBusSize);
    }

    // Linux arch/x86/pci/direct.c pci_conf1_read/write.
    private uint Conf1Read(int device, int register, int length = 4, int function = 0, int bus = 0)
    {
        Span<byte> a = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(a, 0x8000_0000u | (uint)(bus << 16) | (uint)(device << 11) | (uint)(function << 8) | (uint)(register & 0xFC));
        Assert.True(_pio.TryWrite(0xCF8, a));
        Span<byte> d = stackalloc byte[4];
        Assert.True(_pio.TryRead(0xCFCUL + (ulong)(register & 3), d[..length]));
        return length switch { 1 => d[0], 2 => BinaryPrimitives.ReadUInt16LittleEndian(d), _ => BinaryPrimitives.ReadUInt32LittleEndian(d) };
    }

    private void Conf1Write(int device, int register, uint value, int length = 4)
    {
        Span<byte> a = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(a, 0x8000_0000u | (uint)(device << 11) | (uint)(register & 0xFC));
        Assert.True(_pio.TryWrite(0xCF8, a));
        Span<byte> d = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(d, value);
        Assert.True(_pio.TryWrite(0xCFCUL + (ulong)(register & 3), d[..length]));
    }

    private uint EcamRead(int device, int register)
    {
        Span<byte> d = stackalloc byte[4];
        Assert.True(_mmio.TryRead(0xB000_0000UL + (ulong)(device << 15) + (ulong)register, d));
        return BinaryPrimitives.ReadUInt32LittleEndian(d);
    }

    [Fact]
    public void HostBridge_AtDeviceZero()
    {
        Assert.Equal(0x0d57_8086u, Conf1Read(0, PCI_VENDOR_ID));
        Assert.Equal(0x0600_0000u, Conf1Read(0, PCI_CLASS_REVISION) & 0xFFFF_FF00);
        Assert.Equal(0u, Conf1Read(0, PCI_HEADER_TYPE, 1));
    }

    [Fact]
    public void AbsentFunctions_ReadAllOnes()
    {
        Assert.Equal(0xFFFF_FFFFu, Conf1Read(5, PCI_VENDOR_ID));
        Assert.Equal(0xFFFF_FFFFu, Conf1Read(0, PCI_VENDOR_ID, function: 1));
        Assert.Equal(0xFFFF_FFFFu, Conf1Read(0, PCI_VENDOR_ID, bus: 1));
        Assert.Equal(0xFFFF_FFFFu, EcamRead(31, 0));
    }

    [Fact]
    public void ConfigAddress_ReadsBack_AndDisabledDataReadsAllOnes()
    {
        Span<byte> a = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(a, 0x0000_0000); // enable bit clear
        _pio.TryWrite(0xCF8, a);
        Span<byte> d = stackalloc byte[4];
        _pio.TryRead(0xCFC, d);
        Assert.Equal(0xFFFF_FFFFu, BinaryPrimitives.ReadUInt32LittleEndian(d));
        BinaryPrimitives.WriteUInt32LittleEndian(a, 0x8000_0810);
        _pio.TryWrite(0xCF8, a);
        _pio.TryRead(0xCF8, d);
        Assert.Equal(0x8000_0810u, BinaryPrimitives.ReadUInt32LittleEndian(d));
    }

    [Fact]
    public void NarrowDataAccesses_SelectBytesWithinTheDword()
    {
        int slot = _root.AddDevice(new FakePciDevice());
        Assert.Equal(0x1AF4u, Conf1Read(slot, 0, 2));
        Assert.Equal(0x1044u, Conf1Read(slot, 2, 2));
        Assert.Equal(0x10u, Conf1Read(slot, 3, 1));
        Assert.Equal(1u, Conf1Read(slot, PCI_INTERRUPT_PIN, 1));
        Assert.Equal(10u, Conf1Read(slot, PCI_INTERRUPT_LINE, 1));
    }

    [Fact]
    public void ReadOnlyFields_IgnoreWrites_CommandKeepsOnlyDefinedBits()
    {
        int slot = _root.AddDevice(new FakePciDevice());
        Conf1Write(slot, PCI_VENDOR_ID, 0xDEAD_BEEF);
        Assert.Equal(0x1044_1AF4u, Conf1Read(slot, PCI_VENDOR_ID));
        Conf1Write(slot, PCI_COMMAND, 0xFFFF, 2);
        Assert.Equal(0x0547u, Conf1Read(slot, PCI_COMMAND, 2));
        Conf1Write(slot, PCI_SUBSYSTEM_VENDOR_ID, 0);
        Assert.Equal(0x0040_1AF4u, Conf1Read(slot, PCI_SUBSYSTEM_VENDOR_ID));
        Conf1Write(slot, PCI_ROM_ADDRESS, 0xFFFF_FFFF); // no expansion ROM
        Assert.Equal(0u, Conf1Read(slot, PCI_ROM_ADDRESS));
        Conf1Write(slot, PCI_INTERRUPT_LINE, 11, 1);
        Assert.Equal(11u, Conf1Read(slot, PCI_INTERRUPT_LINE, 1));
    }

    /// <summary>Linux drivers/pci/probe.c __pci_read_base: decode off, write ~0, read the mask, restore.</summary>
    [Fact]
    public void BarSizing_AsLinuxDoesIt()
    {
        int slot = _root.AddDevice(new FakePciDevice());
        Conf1Write(slot, PCI_COMMAND, 0, 2);

        uint orig = Conf1Read(slot, PCI_BASE_ADDRESS_0);
        Assert.Equal(0xE000_0000u, orig);
        Conf1Write(slot, PCI_BASE_ADDRESS_0, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_F000u, Conf1Read(slot, PCI_BASE_ADDRESS_0)); // 4 KiB, 32-bit, not prefetchable
        Conf1Write(slot, PCI_BASE_ADDRESS_0, orig);

        uint lo = Conf1Read(slot, PCI_BASE_ADDRESS_2), hi = Conf1Read(slot, PCI_BASE_ADDRESS_3);
        Assert.Equal(0x0000_000Cu, lo); // 64-bit, prefetchable
        Assert.Equal(1u, hi);
        Conf1Write(slot, PCI_BASE_ADDRESS_2, 0xFFFF_FFFF);
        Conf1Write(slot, PCI_BASE_ADDRESS_3, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_C00Cu, Conf1Read(slot, PCI_BASE_ADDRESS_2)); // 16 KiB
        Assert.Equal(0xFFFF_FFFFu, Conf1Read(slot, PCI_BASE_ADDRESS_3));
        Conf1Write(slot, PCI_BASE_ADDRESS_2, lo);
        Conf1Write(slot, PCI_BASE_ADDRESS_3, hi);

        Conf1Write(slot, PCI_BASE_ADDRESS_4, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_FFE1u, Conf1Read(slot, PCI_BASE_ADDRESS_4)); // 32 ports
        Conf1Write(slot, PCI_BASE_ADDRESS_4, 0xC000);
        Assert.Equal(0xC001u, Conf1Read(slot, PCI_BASE_ADDRESS_4));

        Assert.Empty(_observer.Events); // decode was off throughout
        Assert.Equal(0, _root.MappingConflicts);
    }

    [Fact]
    public void Bars_DecodeOnlyWhileEnabled_AndMoveWhenReprogrammed()
    {
        var dev = new FakePciDevice();
        int slot = _root.AddDevice(dev);
        Span<byte> b = stackalloc byte[4];
        Assert.False(_mmio.TryRead(0xE000_0000, b));

        Conf1Write(slot, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 2);
        Assert.True(_mmio.TryRead(0xE000_0FFC, b));
        Assert.Equal(0xFFCUL, dev.Bar0.LastOffset);
        Assert.True(_mmio.TryRead(0x1_0000_3FFC, b));
        Assert.False(_pio.TryRead(0xC000, b)); // I/O decode still off
        Assert.Equal(["map 0 0xe0000000", "map 2 0x100000000"], _observer.Events);

        // Linux pci_std_update_resource: decode off, rewrite, decode on.
        Conf1Write(slot, PCI_COMMAND, 0, 2);
        Assert.False(_mmio.TryRead(0xE000_0000, b));
        Conf1Write(slot, PCI_BASE_ADDRESS_0, 0xE010_0000);
        Conf1Write(slot, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_IO, 2);
        Assert.True(_mmio.TryRead(0xE010_0000, b));
        Assert.False(_mmio.TryRead(0xE000_0000, b));
        Assert.True(_pio.TryRead(0xC01F, b[..1]));
        Assert.Equal(0x1FUL, dev.Bar4.LastOffset);
        Assert.Contains("map 0 0xe0100000", _observer.Events);
        Assert.Contains("unmap 0 0xe0000000", _observer.Events);

        // Moving while decoding (mmio_always_on devices) also works.
        Conf1Write(slot, PCI_BASE_ADDRESS_0, 0xE020_0000);
        Assert.True(_mmio.TryRead(0xE020_0000, b));
        Assert.False(_mmio.TryRead(0xE010_0000, b));
    }

    [Fact]
    public void BarOverAnotherRange_IsLeftUnmappedAndCounted()
    {
        _mmio.Insert(new TagDevice(1), 0xE000_0000, 0x1000); // something already there
        int slot = _root.AddDevice(new FakePciDevice());
        Conf1Write(slot, PCI_COMMAND, PCI_COMMAND_MEMORY, 2);
        Assert.Equal(1, _root.MappingConflicts);
        Span<byte> b = stackalloc byte[1];
        Assert.True(_mmio.TryRead(0xE000_0000, b));
        Assert.Equal(1, b[0]); // still the original owner
        Conf1Write(slot, PCI_BASE_ADDRESS_0, 0xE000_1000); // guest fixes it
        Assert.True(_mmio.TryRead(0xE000_1000, b));
        Assert.Equal(0x10, b[0]);
    }

    [Fact]
    public void BarAtZero_NeverDecodes()
    {
        int slot = _root.AddDevice(new FakePciDevice());
        Conf1Write(slot, PCI_BASE_ADDRESS_0, 0);
        Conf1Write(slot, PCI_COMMAND, PCI_COMMAND_MEMORY, 2);
        Span<byte> b = stackalloc byte[1];
        Assert.False(_mmio.TryRead(0, b));
        Assert.DoesNotContain(_observer.Events, e => e.StartsWith("map 0", StringComparison.Ordinal));
    }

    [Fact]
    public void Capabilities_FormALinkedListWithWriteMasks()
    {
        var dev = new FakePciDevice();
        int first = dev.Config.AddCapability(0x09, [0x10, 0xAA, 0xBB], [0x00, 0xFF, 0x00]); // vendor-specific
        int second = dev.Config.AddCapability(0x11, [0x03, 0x00, 0, 0, 0, 0, 0, 0, 0, 0]);  // MSI-X shaped
        int slot = _root.AddDevice(dev);
        Assert.Equal(0x10u, Conf1Read(slot, PCI_STATUS, 2) & 0x10);
        Assert.Equal((uint)first, Conf1Read(slot, PCI_CAPABILITY_LIST, 1));
        Assert.Equal(0x40, first);
        Assert.Equal(0x09u, Conf1Read(slot, first, 1));
        Assert.Equal((uint)second, Conf1Read(slot, first + 1, 1));
        Assert.Equal(0x48, second);                 // DWORD aligned after 5 bytes
        Assert.Equal(0u, Conf1Read(slot, second + 1, 1)); // end of list
        Conf1Write(slot, first + 2, 0x22_33, 2);
        Assert.Equal(0x22u, Conf1Read(slot, first + 3, 1)); // the writable byte changed
        Assert.Equal(0x10u, Conf1Read(slot, first + 2, 1)); // the read-only ones did not
        Assert.Equal(0xBBu, Conf1Read(slot, first + 4, 1));
        Assert.Contains((first + 2, 2), dev.Writes);
    }

    [Fact]
    public void Ecam_ReachesTheSameConfigSpace_IncludingEmptyExtendedSpace()
    {
        int slot = _root.AddDevice(new FakePciDevice());
        Assert.Equal(0x1044_1AF4u, EcamRead(slot, 0));
        Assert.Equal(0xE000_0000u, EcamRead(slot, PCI_BASE_ADDRESS_0));
        Assert.Equal(0u, EcamRead(slot, 0x100)); // no PCI Express extended capabilities
        Span<byte> d = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(d, PCI_COMMAND_MEMORY);
        Assert.True(_mmio.TryWrite(0xB000_0000UL + (ulong)(slot << 15) + PCI_COMMAND, d));
        Span<byte> b = stackalloc byte[1];
        Assert.True(_mmio.TryRead(0xE000_0000, b));
    }

    [Fact]
    public void AddDevice_AssignsSlotsAndRejectsTakenOnes()
    {
        Assert.Equal(1, _root.AddDevice(new FakePciDevice(0xE000_0000, 0x1_0000_0000, 0xC000)));
        Assert.Throws<InvalidOperationException>(() => _root.AddDevice(new FakePciDevice(), 1));
        Assert.Throws<InvalidOperationException>(() => _root.AddDevice(new FakePciDevice(), 0));
        _root.AddDevice(new FakePciDevice(), 5);
        Assert.Equal(2, _root.AddDevice(new FakePciDevice()));
        Assert.Throws<ArgumentOutOfRangeException>(() => _root.AddDevice(new FakePciDevice(), 32));
    }

    [Fact]
    public void AddBar_ValidatesItsArguments()
    {
        var config = new PciConfigSpace(1, 2, 0);
        var region = new TagDevice(0);
        Assert.Throws<ArgumentOutOfRangeException>(() => config.AddBar(0, PciBarKind.Memory32, 0x1800, 0xE000_0000, region));
        Assert.Throws<ArgumentOutOfRangeException>(() => config.AddBar(0, PciBarKind.Memory32, 8, 0xE000_0000, region));
        Assert.Throws<ArgumentOutOfRangeException>(() => config.AddBar(0, PciBarKind.Memory32, 0x1000, 0xE000_0800, region));
        Assert.Throws<ArgumentOutOfRangeException>(() => config.AddBar(0, PciBarKind.Memory32, 0x1000, 0x1_0000_0000, region));
        Assert.Throws<ArgumentOutOfRangeException>(() => config.AddBar(5, PciBarKind.Memory64, 0x1000, 0, region));
        config.AddBar(0, PciBarKind.Memory64, 0x1000, 0x1_0000_0000, region);
        Assert.Throws<InvalidOperationException>(() => config.AddBar(1, PciBarKind.Memory32, 0x1000, 0, region));
        Assert.Equal(0x1_0000_0000UL, config.GetBarAddress(0));
    }
}
