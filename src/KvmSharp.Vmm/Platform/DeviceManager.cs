using KvmSharp.Boot.Acpi;
using KvmSharp.Devices;
using KvmSharp.Devices.Pci;
using KvmSharp.Devices.Virtio;
using KvmSharp.Kvm;
using KvmSharp.Memory;
using KvmSharp.Vmm.Interrupts;

using KvmSharp.Vmm.Virtio;

namespace KvmSharp.Vmm.Platform;

/// <summary>
/// Places the VM's devices on the machine (<see cref="PlatformLayout"/>, the one source of ports,
/// IRQs and windows): the legacy PC devices, the ACPI PM and reset registers, the PCI host bridge
/// and its devices, virtio-mmio slots. It allocates BARs, PCI slots, virtio-mmio slots and GSIs,
/// asks the <see cref="IInterruptController"/> for the lines, owns the eventfds it creates, and
/// lists what it placed (<see cref="Devices"/>) for state save and for the test that checks the
/// guest's tables against the wiring (firecracker device_manager/{legacy,mmio,pci_mngr}.rs,
/// CH vmm/src/device_manager.rs).
/// </summary>
/// <remarks>
/// Adding a device takes <c>_lock</c>, so a device can be added after boot (hotplug, from the API
/// thread) as well as during build; the buses are copy-on-write, so vCPUs never wait for it.
/// </remarks>
internal sealed class DeviceManager : IDisposable
{
    private readonly GuestMemory _memory;
    private readonly IInterruptController _irqs;
    private readonly Action<VmExit> _stop;
    private readonly KvmVm? _vmFd;
    private readonly Func<EventLoop> _eventLoop;
    private VirtioNotifier? _pciNotifier;
    private readonly TextWriter _diagnostics;
    private readonly List<DeviceInfo> _devices = [];
    private readonly List<IDisposable> _owned = [];
    private readonly List<string> _mmioCommandLine = [];

    // Guards the allocators and the lists above.
    private readonly Lock _lock = new();
    private ulong _nextBar = PlatformLayout.Pci32WindowStart;
    private int _nextSlot = 1; // 00:00.0 is the host bridge
    private int _mmioDevices;

    /// <param name="memory">Guest RAM, for the virtio transports.</param>
    /// <param name="irqs">Interrupt lines and MSI routes.</param>
    /// <param name="stop">Ends the VM (i8042 reset, ACPI S5, reset register, debug exit).</param>
    /// <param name="vmFd">For ioeventfds (virtio queue kicks); null in unit tests, which add no virtio device.</param>
    /// <param name="eventLoop">The I/O thread, made on first use.</param>
    /// <param name="diagnostics">Where host refusals are reported.</param>
    public DeviceManager(GuestMemory memory, IInterruptController irqs, Action<VmExit> stop, KvmVm? vmFd, Func<EventLoop> eventLoop, TextWriter diagnostics)
    {
        _memory = memory;
        _irqs = irqs;
        _stop = stop;
        _vmFd = vmFd;
        _eventLoop = eventLoop;
        _diagnostics = diagnostics;
    }

    public Bus PioBus { get; } = new();
    public Bus MmioBus { get; } = new();

    /// <summary>The PCI host bridge, once <see cref="AddAcpiPlatform"/> has run.</summary>
    public PciRoot? Pci { get; private set; }

    /// <summary>What is placed, in order.</summary>
    public IReadOnlyList<DeviceInfo> Devices
    {
        get
        {
            lock (_lock)
                return [.. _devices];
        }
    }

    /// <summary>The <c>virtio_mmio.device=</c> words for the kernel command line, each with a leading space.</summary>
    public string MmioCommandLine
    {
        get
        {
            lock (_lock)
                return string.Concat(_mmioCommandLine.Select(w => " " + w));
        }
    }

    /// <summary>
    /// COM1 on <paramref name="console"/>, the i8042 (CPU reset), the CMOS RTC (with the RAM sizes),
    /// the io_delay port, and, when asked, the debug-exit port.
    /// </summary>
    /// <returns>The UART (console input goes to it).</returns>
    public Serial8250 AddLegacyDevices(Stream console, ulong ramBytes, bool debugExit)
    {
        var serial = new Serial8250(_irqs.CreateEdgeLine(PlatformLayout.Com1Irq), console);
        AddPio("com1", serial, PlatformLayout.Com1Port, PlatformLayout.Com1PortCount, PlatformLayout.Com1Irq);
        var i8042 = new I8042(() => _stop(VmExit.Of(VmExitKind.GuestReboot, "guest reset the CPU through the i8042")));
        // No keyboard, so no interrupt line: the DSDT still names IRQ 1, the i8042's ISA IRQ.
        AddPio("i8042-data", i8042.DataPort, PlatformLayout.I8042DataPort, 1, null);
        AddPio("i8042-command", i8042.CommandPort, PlatformLayout.I8042CommandPort, 1, null);
        ulong below4g = Math.Min(ramBytes, MemoryLayout.MmioHoleStart);
        // The RTC raises no interrupt yet (Devices README); IRQ 8 is reserved for it.
        AddPio("rtc", new CmosRtc(() => DateTime.UtcNow, below4g, ramBytes - below4g), PlatformLayout.RtcPort, PlatformLayout.RtcPortCount, null);
        // Port 0x80 is Linux's io_delay port: accept and ignore writes instead of logging each one.
        AddPio("io-delay", new NullDevice(), PlatformLayout.IoDelayPort, 1, null);
        if (debugExit)
            AddPio("debug-exit", new DebugExit(v => _stop(VmExit.Of(VmExitKind.DebugExit, $"guest wrote 0x{v:x} to the debug-exit port", v))), PlatformLayout.DebugExitPort, 1, null);
        return serial;
    }

    /// <summary>
    /// The ACPI PM and reset registers and the PCI host bridge (mechanism #1 and ECAM), whose
    /// virtio-pci devices get their queue kicks on ioeventfds served by the I/O thread.
    /// </summary>
    public void AddAcpiPlatform()
    {
        AddPio("acpi-pm", new AcpiPm(() => _stop(VmExit.Of(VmExitKind.GuestPowerOff, "guest powered off (ACPI S5)"))),
            PlatformLayout.Pm1aEventBlock, PlatformLayout.AcpiPmPortCount, null);
        var reset = new ResetControl(() => _stop(VmExit.Of(VmExitKind.GuestReboot, "guest reset through the ACPI reset register")));

        // The virtio-pci queues' ioeventfds follow BAR 0 wherever the guest maps it.
        VirtioNotifier? notifier = _vmFd is null ? null : new VirtioNotifier();
        _pciNotifier = notifier;
        var pci = new PciRoot(MmioBus, PioBus, notifier);
        AddPio("pci-config", reset.CombineWithPciConfigIo(pci.ConfigIo), PlatformLayout.PciConfigIoPort, PlatformLayout.PciConfigIoLength, null);
        Add("ecam", pci.Ecam, BusKind.Mmio, PlatformLayout.EcamBase, PlatformLayout.EcamSize, null);
        Pci = pci;
    }

    /// <summary>Adds <paramref name="device"/> on virtio-pci (when <paramref name="mmio"/> is false) or virtio-mmio.</summary>
    public void AddVirtio(IVirtioDevice device, bool mmio)
    {
        if (mmio)
            AddVirtioMmio(device);
        else
            AddVirtioPci(Pci ?? throw new InvalidOperationException("virtio-pci needs the PCI host bridge (AddAcpiPlatform)."), _irqs.Msi, device);
    }

    /// <summary>
    /// A virtio-mmio device: 4 KiB at the next slot above <see cref="PlatformLayout.VirtioMmioBase"/>,
    /// its own ISA IRQ as an irqfd edge, announced with virtio_mmio.device= (virtio 1.2 §4.2;
    /// Linux's VIRTIO_MMIO_CMDLINE_DEVICES).
    /// </summary>
    private void AddVirtioMmio(IVirtioDevice device)
    {
        var (slot, address, gsi) = AllocateMmioSlot();
        var irq = _irqs.CreateEdgeLine(gsi);
        var events = CreateQueueEvents(device);
        var inline = events is null ? new InlineQueueNotifier() : null;
        var transport = new VirtioMmioTransport(device, _memory, irq, (IVirtioQueueNotifier?)events ?? inline!);
        if (events is not null)
        {
            events.Attach(transport);
            // One QueueNotify register for all queues: the written value is the queue index (virtio 1.2 §4.2.2).
            events.AssignIoeventfds(address + VirtioMmioTransport.QueueNotifyOffset, stride: 0, width: 4, matchQueueIndex: true);
        }
        else
        {
            inline!.Transport = transport;
        }
        Add($"virtio-mmio@0x{address:x}", transport, BusKind.Mmio, address, VirtioMmioTransport.RegionSize, gsi);
        lock (_lock)
            _mmioCommandLine.Add(PlatformLayout.VirtioMmioCommandLine(slot));
    }

    private void AddVirtioPci(PciRoot pci, IMsiSink msi, IVirtioDevice device)
    {
        ulong bar0 = AllocateBar(VirtioPciTransport.Bar0Size);
        ulong bar2 = AllocateBar(MsixTable.RegionSize);
        int slot = AllocatePciSlot();
        uint gsi = (uint)PlatformLayout.PciIntxGsi(slot, 0);
        var intx = _irqs.CreateLevelLine(gsi);
        var events = CreateQueueEvents(device);
        var inline = events is null ? new InlineQueueNotifier() : null;
        var transport = new VirtioPciTransport(device, _memory, msi, intx, (IVirtioQueueNotifier?)events ?? inline!, bar0, bar2);
        if (events is not null)
        {
            events.Attach(transport);
            _pciNotifier!.Track(transport, events); // its ioeventfds follow BAR 0
        }
        else
        {
            inline!.Transport = transport;
        }
        pci.AddDevice(transport, slot);
        lock (_lock)
            _devices.Add(new DeviceInfo($"virtio-pci@00:{slot:x2}.0", transport, BusKind.Mmio, bar0, VirtioPciTransport.Bar0Size, gsi));
    }

    /// <summary>The next virtio-mmio slot: its index, address and GSI.</summary>
    /// <exception cref="VmConfigException">All slots are taken.</exception>
    internal (int Slot, ulong Address, uint Gsi) AllocateMmioSlot()
    {
        lock (_lock)
        {
            if (_mmioDevices >= PlatformLayout.VirtioMmioSlotCount)
                throw new VmConfigException($"At most {PlatformLayout.VirtioMmioSlotCount} virtio-mmio devices fit this platform's free IRQs.");
            int slot = _mmioDevices++;
            var (address, irq) = PlatformLayout.VirtioMmioSlot(slot);
            return (slot, address, irq);
        }
    }

    /// <summary>The next free device number on bus 0.</summary>
    /// <exception cref="VmConfigException">All 31 are taken.</exception>
    internal int AllocatePciSlot()
    {
        lock (_lock)
        {
            if (_nextSlot >= PciRoot.MaxDevices)
                throw new VmConfigException($"At most {PciRoot.MaxDevices - 1} PCI devices fit bus 0.");
            return _nextSlot++;
        }
    }

    /// <summary>A naturally aligned range of <paramref name="size"/> (a power of two) in the 32-bit PCI window.</summary>
    /// <exception cref="VmConfigException">The window is full.</exception>
    internal ulong AllocateBar(ulong size)
    {
        lock (_lock)
        {
            ulong address = (_nextBar + size - 1) & ~(size - 1); // BARs are naturally aligned (PCI LB 3.0 §6.2.5.1)
            if (address + size > PlatformLayout.Pci32WindowStart + PlatformLayout.Pci32WindowSize)
                throw new VmConfigException("Too many PCI devices for the 32-bit MMIO window.");
            _nextBar = address + size;
            return address;
        }
    }

    /// <summary>
    /// The per-queue eventfds of a virtio device: the only way into it (kicks by ioeventfd, or by the
    /// transport's notify register when KVM refused one), served on the I/O thread. Null without KVM
    /// (layout unit tests), where kicks go to the transport inline.
    /// </summary>
    private VirtioQueueEvents? CreateQueueEvents(IVirtioDevice device)
    {
        if (_vmFd is null)
            return null;
        var events = new VirtioQueueEvents(_vmFd, _eventLoop(), device.QueueCount, _diagnostics);
        Own(events);
        return events;
    }

    /// <summary>Without KVM (unit tests of the layout) a kick reaches the transport on the calling thread.</summary>
    private sealed class InlineQueueNotifier : IVirtioQueueNotifier
    {
        public IVirtioTransport? Transport { get; set; }

        public void Notify(int queueIndex) => Transport?.NotifyQueue(queueIndex);
    }

    /// <summary>Disposes <paramref name="resource"/> with the manager (eventfds, kick handlers, TAP devices).</summary>
    public void Own(IDisposable resource)
    {
        lock (_lock)
            _owned.Add(resource);
    }

    private void AddPio(string name, IBusDevice device, ushort port, ulong length, uint? gsi) =>
        Add(name, device, BusKind.Pio, port, length, gsi);

    private void Add(string name, IBusDevice device, BusKind bus, ulong baseAddress, ulong length, uint? gsi)
    {
        (bus == BusKind.Pio ? PioBus : MmioBus).Insert(device, baseAddress, length);
        lock (_lock)
            _devices.Add(new DeviceInfo(name, device, bus, baseAddress, length, gsi));
    }

    public void Dispose()
    {
        lock (_lock)
        {
            foreach (var o in _owned)
                o.Dispose();
            _owned.Clear();
        }
    }

    /// <summary>Claims a port range and ignores it (port 0x80 io_delay).</summary>
    private sealed class NullDevice : IBusDevice
    {
        public void Read(ulong offset, Span<byte> data) => data.Fill(0xFF);
        public void Write(ulong offset, ReadOnlySpan<byte> data) { }
    }
}
