using System.Buffers.Binary;

namespace KvmSharp.Devices.Pci;

/// <summary>A PCI function on the root bus.</summary>
public interface IPciDevice
{
    /// <summary>Its configuration space; <see cref="PciRoot"/> applies guest accesses to it.</summary>
    PciConfigSpace Config { get; }

    /// <summary>
    /// Called after a guest write to configuration space [<paramref name="offset"/>,
    /// <paramref name="offset"/> + <paramref name="length"/>) was applied, under the root's lock:
    /// the place to react to capability writes (MSI-X enable, say). Must be short.
    /// </summary>
    void ConfigWritten(int offset, int length);

    /// <summary>
    /// Called before a guest read of [<paramref name="offset"/>, <paramref name="offset"/> +
    /// <paramref name="length"/>), under the root's lock: the place to refresh bytes computed on
    /// demand (virtio's pci_cfg_data window). Must be short.
    /// </summary>
    void ConfigReading(int offset, int length);
}

/// <summary>
/// Told when a BAR starts or stops decoding at an address, so the VMM can move what it
/// attached there outside the buses (ioeventfds on a virtio notify region, for example).
/// </summary>
public interface IPciBarObserver
{
    /// <summary>BAR <paramref name="bar"/> of <paramref name="device"/> now decodes at <paramref name="address"/>.</summary>
    void BarMapped(IPciDevice device, PciBar bar, ulong address);

    /// <summary>BAR <paramref name="bar"/> of <paramref name="device"/> no longer decodes at <paramref name="address"/>.</summary>
    void BarUnmapped(IPciDevice device, PciBar bar, ulong address);
}

/// <summary>
/// PCI bus 0 behind a host bridge at 00:00.0: up to 31 single-function devices, configuration
/// access through mechanism #1 (ports 0xCF8/0xCFC, PCI LB 3.0 §3.2.2.3.2) and through ECAM (PCI
/// Express Base 4.0 §7.2.2, described to the guest by the ACPI MCFG table).
/// </summary>
/// <remarks>
/// <para><b>BARs.</b> A BAR decodes, and its region is inserted on the MMIO or port I/O bus,
/// while the matching command-register enable (memory or I/O space) is set and the BAR holds a
/// usable address. Re-evaluated after every configuration write, so a guest that reprograms a BAR
/// moves the region (Linux turns decoding off while it sizes or rewrites BARs). A BAR the guest
/// places over another range is left unmapped and counted in <see cref="MappingConflicts"/>: guest
/// error, never an exception.</para>
/// <para><b>Threads.</b> Configuration accesses (vCPU threads) serialise on the root's lock; lock
/// order: root lock, then the <see cref="Bus"/> writer lock, then whatever a device or observer
/// takes. BAR accesses go from the bus to the region directly, without the root.</para>
/// </remarks>
public sealed class PciRoot
{
    /// <summary>Device numbers on a bus (PCI LB 3.0 §3.2.2.3.2: 5 bits).</summary>
    public const int MaxDevices = 32;

    /// <summary>ECAM bytes per bus: 32 devices × 8 functions × 4 KiB.</summary>
    public const ulong EcamBusSize = 1UL << 20;

    /// <summary>Length to insert <see cref="ConfigIo"/> with: CONFIG_ADDRESS (4) and CONFIG_DATA (4).</summary>
    public const int ConfigIoLength = 8;

    private const uint CONFIG_ADDRESS_ENABLE = 0x8000_0000;

    private readonly Bus _mmio;
    private readonly Bus _pio;
    private readonly IPciBarObserver? _observer;
    private readonly IPciDevice?[] _devices = new IPciDevice?[MaxDevices];
    private readonly ulong?[][] _mapped = new ulong?[MaxDevices][];

    // Guards _devices, _mapped, _configAddress and every device's config space.
    private readonly Lock _lock = new();
    private uint _configAddress;
    private long _mappingConflicts;

    /// <summary>Creates bus 0 with its host bridge at device 0.</summary>
    /// <param name="mmio">Where memory BARs are inserted.</param>
    /// <param name="pio">Where I/O BARs are inserted.</param>
    /// <param name="observer">Told about BAR moves, or null.</param>
    public PciRoot(Bus mmio, Bus pio, IPciBarObserver? observer = null)
    {
        ArgumentNullException.ThrowIfNull(mmio);
        ArgumentNullException.ThrowIfNull(pio);
        _mmio = mmio;
        _pio = pio;
        _observer = observer;
        AddDevice(new HostBridge(), 0);
        ConfigIo = new ConfigIoPorts(this);
        Ecam = new EcamRegion(this);
    }

    /// <summary>Mechanism #1 ports; insert on the port I/O bus at 0xCF8 (PCI LB 3.0 §3.2.2.3.2),
    /// length <see cref="ConfigIoLength"/>.</summary>
    public IBusDevice ConfigIo { get; }

    /// <summary>ECAM window for bus 0; insert on the MMIO bus at the MCFG base address, length
    /// <see cref="EcamBusSize"/>.</summary>
    public IBusDevice Ecam { get; }

    /// <summary>BAR placements refused because the range was taken.</summary>
    public long MappingConflicts => Interlocked.Read(ref _mappingConflicts);

    /// <summary>Adds <paramref name="device"/> in the first free slot.</summary>
    /// <returns>Its device number (1-31).</returns>
    /// <exception cref="InvalidOperationException">The bus is full.</exception>
    public int AddDevice(IPciDevice device)
    {
        lock (_lock)
        {
            for (int slot = 1; slot < MaxDevices; slot++)
            {
                if (_devices[slot] is null)
                {
                    AddDeviceLocked(device, slot);
                    return slot;
                }
            }
        }
        throw new InvalidOperationException("PCI bus 0 has no free device number.");
    }

    /// <summary>Adds <paramref name="device"/> as device number <paramref name="slot"/>.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="slot"/> is not 0-31.</exception>
    /// <exception cref="InvalidOperationException">The slot is taken.</exception>
    public void AddDevice(IPciDevice device, int slot)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(slot);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(slot, MaxDevices);
        lock (_lock)
        {
            if (_devices[slot] is not null)
                throw new InvalidOperationException($"PCI device number {slot} is taken.");
            AddDeviceLocked(device, slot);
        }
    }

    private void AddDeviceLocked(IPciDevice device, int slot)
    {
        ArgumentNullException.ThrowIfNull(device);
        _devices[slot] = device;
        _mapped[slot] = new ulong?[6];
        UpdateMappingsLocked(slot); // the VMM may have enabled decoding already
    }

    /// <summary>Configuration read; an absent function reads all ones (PCI LB 3.0 §6.1).</summary>
    public void ConfigRead(int bus, int device, int function, int offset, Span<byte> data)
    {
        lock (_lock)
        {
            IPciDevice? d = FindLocked(bus, device, function);
            if (d is null)
            {
                data.Fill(0xFF);
                return;
            }
            d.ConfigReading(offset, data.Length);
            d.Config.Read(offset, data);
        }
    }

    /// <summary>Configuration write; writes to an absent function are dropped.</summary>
    public void ConfigWrite(int bus, int device, int function, int offset, ReadOnlySpan<byte> data)
    {
        lock (_lock)
        {
            IPciDevice? d = FindLocked(bus, device, function);
            if (d is null)
                return;
            d.Config.Write(offset, data);
            UpdateMappingsLocked(device);
            d.ConfigWritten(offset, data.Length);
        }
    }

    private IPciDevice? FindLocked(int bus, int device, int function) =>
        bus == 0 && function == 0 && (uint)device < MaxDevices ? _devices[device] : null;

    private void UpdateMappingsLocked(int slot)
    {
        IPciDevice device = _devices[slot]!;
        PciConfigSpace config = device.Config;
        ushort command = config.Command;
        ulong?[] mapped = _mapped[slot];
        foreach (PciBar? bar in config.Bars)
        {
            if (bar is null)
                continue;
            bool io = bar.Kind == PciBarKind.Io;
            bool decode = (command & (io ? PciConfigSpace.COMMAND_IO : PciConfigSpace.COMMAND_MEMORY)) != 0;
            ulong address = config.GetBarAddress(bar.Index);
            ulong? wanted = decode && Usable(bar, address) ? address : null;
            if (wanted == mapped[bar.Index])
                continue;

            Bus bus = io ? _pio : _mmio;
            if (mapped[bar.Index] is ulong old)
            {
                bus.Remove(old);
                mapped[bar.Index] = null;
                _observer?.BarUnmapped(device, bar, old);
            }
            if (wanted is ulong target)
            {
                if (bus.TryInsert(bar.Region, target, bar.Size))
                {
                    mapped[bar.Index] = target;
                    _observer?.BarMapped(device, bar, target);
                }
                else
                {
                    Interlocked.Increment(ref _mappingConflicts);
                }
            }
        }
    }

    /// <summary>Address 0 and ranges past the end of the space never decode.</summary>
    private static bool Usable(PciBar bar, ulong address)
    {
        if (address == 0)
            return false;
        ulong end = address + bar.Size;
        if (end < address)
            return false;
        return bar.Kind != PciBarKind.Io || end <= 0x1_0000;
    }

    /// <summary>The host bridge at 00:00.0, as Cloud Hypervisor presents it (Intel 0x0d57, class 06/00).</summary>
    private sealed class HostBridge : IPciDevice
    {
        public PciConfigSpace Config { get; } = new(0x8086, 0x0d57, 0x06_00_00);

        public void ConfigWritten(int offset, int length)
        {
        }

        public void ConfigReading(int offset, int length)
        {
        }
    }

    /// <summary>Configuration mechanism #1 (PCI LB 3.0 §3.2.2.3.2).</summary>
    private sealed class ConfigIoPorts(PciRoot root) : IBusDevice
    {
        public void Read(ulong offset, Span<byte> data)
        {
            if (offset < 4)
            {
                // CONFIG_ADDRESS is decoded only for DWORD accesses; others are not ours to answer.
                if (offset == 0 && data.Length == 4)
                {
                    lock (root._lock)
                        BinaryPrimitives.WriteUInt32LittleEndian(data, root._configAddress);
                }
                else
                {
                    data.Fill(0xFF);
                }
                return;
            }
            uint address;
            lock (root._lock)
                address = root._configAddress;
            if ((address & CONFIG_ADDRESS_ENABLE) == 0 || offset - 4 + (ulong)data.Length > 4)
            {
                data.Fill(0xFF);
                return;
            }
            Decode(address, out int bus, out int device, out int function, out int register);
            root.ConfigRead(bus, device, function, register + (int)(offset - 4), data);
        }

        public void Write(ulong offset, ReadOnlySpan<byte> data)
        {
            if (offset < 4)
            {
                if (offset == 0 && data.Length == 4)
                {
                    lock (root._lock)
                        root._configAddress = BinaryPrimitives.ReadUInt32LittleEndian(data);
                }
                return; // a byte at 0xCF9 is the reset control register: see ResetControl.CombineWithPciConfigIo
            }
            uint address;
            lock (root._lock)
                address = root._configAddress;
            if ((address & CONFIG_ADDRESS_ENABLE) == 0 || offset - 4 + (ulong)data.Length > 4)
                return;
            Decode(address, out int bus, out int device, out int function, out int register);
            root.ConfigWrite(bus, device, function, register + (int)(offset - 4), data);
        }

        private static void Decode(uint address, out int bus, out int device, out int function, out int register)
        {
            bus = (int)((address >> 16) & 0xFF);
            device = (int)((address >> 11) & 0x1F);
            function = (int)((address >> 8) & 0x7);
            register = (int)(address & 0xFC);
        }
    }

    /// <summary>ECAM: offset = bus &lt;&lt; 20 | device &lt;&lt; 15 | function &lt;&lt; 12 | register.</summary>
    private sealed class EcamRegion(PciRoot root) : IBusDevice
    {
        public void Read(ulong offset, Span<byte> data)
        {
            Decode(offset, out int bus, out int device, out int function, out int register);
            if (register + data.Length > 4096)
            {
                data.Fill(0xFF); // crosses into the next function
                return;
            }
            root.ConfigRead(bus, device, function, register, data);
        }

        public void Write(ulong offset, ReadOnlySpan<byte> data)
        {
            Decode(offset, out int bus, out int device, out int function, out int register);
            if (register + data.Length > 4096)
                return;
            root.ConfigWrite(bus, device, function, register, data);
        }

        private static void Decode(ulong offset, out int bus, out int device, out int function, out int register)
        {
            bus = (int)(offset >> 20);
            device = (int)((offset >> 15) & 0x1F);
            function = (int)((offset >> 12) & 0x7);
            register = (int)(offset & 0xFFF);
        }
    }
}
