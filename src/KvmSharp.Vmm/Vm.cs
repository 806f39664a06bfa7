using System.Diagnostics;
using System.Runtime.InteropServices;
using KvmSharp.Boot;
using KvmSharp.Boot.Acpi;
using KvmSharp.Devices;
using KvmSharp.Devices.Pci;
using KvmSharp.Devices.Virtio;
using KvmSharp.Images;
using KvmSharp.Interop;
using KvmSharp.Kvm;
using KvmSharp.Memory;
using KvmSharp.Vmm.Console;
using KvmSharp.Vmm.Cpu;
using KvmSharp.Vmm.Pci;
using KvmSharp.Vmm.Pvm;
using KvmSharp.Vmm.Virtio;

namespace KvmSharp.Vmm;

/// <summary>
/// One running VM: KVM objects, guest RAM, the buses with their devices, and one thread per vCPU.
/// Built by <see cref="Create"/>; <see cref="Run"/> blocks until the guest or the user ends it.
/// </summary>
public sealed class Vm : IDisposable
{
    // Intel VMX needs three pages for the real-mode TSS and one for the identity map, outside RAM
    // and below 4 GiB (api.rst: KVM_SET_TSS_ADDR). They sit just below the BIOS area at the top of the hole.
    private const ulong TssAddress = 0xFFFB_D000;
    private const ulong IdentityMapAddress = 0xFFFB_C000;
    private const uint SerialGsi = 4;
    private const uint EpollEdgeTriggered = 1u << 31; // EPOLLET

    private readonly KvmSystem _kvm;
    private readonly KvmVm _vmFd;
    private readonly List<KvmVcpu> _vcpus = [];
    private readonly List<VcpuRunner> _runners = [];
    private readonly List<IDisposable> _owned = [];
    private readonly ManualResetEventSlim _stopped = new();
    private readonly RateLimitedLog _log;
    private readonly PanicDetector _panic = new();
    private readonly TextWriter _diagnostics;
    private VmExit _exit;
    private int _stopRequested;
    private Serial8250 _serial = null!;
    private ConsoleInput? _input;
    private Timer? _pvmPoller;
    private EventLoop? _eventLoop;
    private VirtioNotifier? _virtioNotifier;
    private ulong _nextBar = PlatformLayout.Pci32WindowStart;
    private int _nextSlot = 1;
    private VirtioConsole? _virtioConsole;
    private PciRoot? _pci;
    private KvmMsiRoutes? _msi;
    private int _mmioDevices;
    private string _mmioCommandLine = "";
    private int _consoleOutFd = 1;

    private Vm(VmConfig config, KvmSystem kvm, KvmVm vmFd, GuestMemory memory, TextWriter diagnostics)
    {
        Config = config;
        _kvm = kvm;
        _vmFd = vmFd;
        Memory = memory;
        _diagnostics = diagnostics;
        _log = new RateLimitedLog(diagnostics, burst: 20, period: TimeSpan.FromSeconds(10));
    }

    public VmConfig Config { get; }
    public GuestMemory Memory { get; }
    public Bus PioBus { get; } = new();
    public Bus MmioBus { get; } = new();
    public bool IsPvm { get; private init; }
    public BootResult Boot { get; private set; } = null!;
    public string EffectiveCommandLine { get; private set; } = "";

    /// <summary>The virtio-balloon, when configured: <see cref="VirtioBalloon.SetTargetPages"/> resizes it.</summary>
    public VirtioBalloon? Balloon { get; private set; }

    internal bool StopRequested => Volatile.Read(ref _stopRequested) != 0;

    /// <summary>
    /// Builds the VM: memory, in-kernel irqchip and PIT, devices, kernel, vCPUs. The kernel, initrd and
    /// disk images are opened and checked first, before KVM: a bad input costs no KVM objects and no
    /// guest RAM, and its size is checked against the guest's RAM layout before it is read. Whatever
    /// fails, everything created so far is disposed before the exception leaves.
    /// </summary>
    /// <exception cref="VmConfigException">The configuration cannot work, or a disk image cannot be used.</exception>
    /// <exception cref="BootException">The kernel or initrd cannot be loaded.</exception>
    /// <exception cref="NativeException">KVM or the host refused something.</exception>
    public static Vm Create(VmConfig config, int consoleOutFd = 1, int consoleInFd = 0, TextWriter? diagnostics = null)
    {
        config.Validate();
        diagnostics ??= System.Console.Error;
        // The kernel's segments and the initrd go in low RAM above 1 MiB (LowMemory.HighMemory), below
        // the MMIO hole: no file larger than that can be loaded, so none is read.
        ulong room = Math.Min(config.MemoryBytes, MemoryLayout.MmioHoleStart) - LowMemory.HighMemory;
        var kernel = KernelImage.Load(config.KernelPath, room);
        if (config.DecompressInVmm)
            kernel.EnsureDecompressible();
        var template = CpuTemplate.Parse(config.CpuTemplate);
        if (config.HugePages)
            CheckHugePages(config.MemoryBytes);

        var disks = new List<IBlockDevice>();
        InitrdImage? initrd = null;
        KvmSystem? kvm = null;
        KvmVm? vmFd = null;
        GuestMemory? memory = null;
        Vm? vm = null;
        try
        {
            initrd = config.InitrdPath is null ? null : InitrdImage.Open(config.InitrdPath, room);
            foreach (var d in config.Disks)
                disks.Add(OpenDisk(d));

            kvm = KvmSystem.Open();
            vmFd = kvm.CreateVm();
            memory = GuestMemory.CreateAnonymous(MemoryLayout.RamRanges(config.MemoryBytes),
                new GuestMemoryOptions { Mergeable = config.Mergeable, HugePages = config.HugePages, Prefault = config.Prefault });
            bool pvm = config.PvmCompat ?? KvmSystem.IsPvmHost;
            vm = new Vm(config, kvm, vmFd, memory, diagnostics) { IsPvm = pvm };
            vm._owned.AddRange(disks); // from here on the VM disposes them
            vm.Build(kernel, initrd, disks, template, consoleOutFd, consoleInFd);
            return vm;
        }
        catch (Exception e)
        {
            if (vm is not null)
            {
                DisposeAfterFailure(vm);
            }
            else
            {
                foreach (var d in disks)
                    DisposeAfterFailure(d);
                if (memory is not null)
                    DisposeAfterFailure(memory);
                if (vmFd is not null)
                    DisposeAfterFailure(vmFd);
                if (kvm is not null)
                    DisposeAfterFailure(kvm);
            }
            if (e is VmConfigException or BootException or NativeException)
                throw;
            // Anything else (a guest-memory or argument check deep in device setup) is still one
            // sentence for the user; the original stays as the inner exception for diagnostics.
            throw new VmConfigException($"Cannot build the VM: {e.Message}", e);
        }
        finally
        {
            initrd?.Dispose(); // copied into guest memory by Build, or not needed
        }
    }

    /// <summary>
    /// Guest RAM is mapped MAP_HUGETLB | MAP_NORESERVE, so mmap succeeds even when the host has no huge
    /// pages, and the first write to guest memory is a SIGBUS that kills the process. Counting the free,
    /// unreserved huge pages of the default size first (Documentation/admin-guide/mm/hugetlbpage.rst,
    /// /proc/meminfo) turns that into one sentence. Racy against other users of the pool, but those are
    /// the host's administrator's to size.
    /// </summary>
    private static void CheckHugePages(ulong memoryBytes)
    {
        ulong free = 0, reserved = 0, pageKiB = 0;
        try
        {
            foreach (string line in File.ReadLines("/proc/meminfo"))
            {
                var parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                if (parts.Length >= 2 && ulong.TryParse(parts[1], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out ulong v))
                {
                    switch (parts[0])
                    {
                        case "HugePages_Free:": free = v; break;
                        case "HugePages_Rsvd:": reserved = v; break;
                        case "Hugepagesize:": pageKiB = v; break;
                    }
                }
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return; // no /proc: let mmap decide
        }
        if (pageKiB == 0)
            throw new VmConfigException("--hugepages: this host's kernel has no huge pages (no Hugepagesize in /proc/meminfo).");
        ulong pageBytes = pageKiB << 10;
        ulong needed = memoryBytes / pageBytes + (memoryBytes % pageBytes != 0 ? 1UL : 0UL);
        ulong available = free > reserved ? free - reserved : 0;
        if (available < needed)
            throw new VmConfigException($"--hugepages needs {needed} free huge pages of {pageKiB} kB for {memoryBytes >> 20} MiB of guest RAM; the host has {available} (reserve them with /proc/sys/vm/nr_hugepages).");
    }

    /// <summary>Opens a disk image; a bad one (corrupt header, missing backing file) is one sentence naming it.</summary>
    private static IBlockDevice OpenDisk(DiskConfig d)
    {
        try
        {
            return BlockDeviceFactory.Open(d.Path, d.ReadOnly, d.Format);
        }
        catch (ImageException e)
        {
            string where = e.Path == d.Path ? e.ToUserString() : $"{d.Path}: {e.ToUserString()}";
            throw new VmConfigException($"Disk image {where}", e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new VmConfigException($"Disk image {d.Path} cannot be opened: {e.Message}", e);
        }
    }

    /// <summary>Cleanup on a path that is already failing: a second error must not replace the first.</summary>
    private static void DisposeAfterFailure(IDisposable d)
    {
        try
        {
            d.Dispose();
        }
        catch (Exception e) when (e is IOException or InvalidOperationException or ObjectDisposedException or ImageException)
        {
        }
    }

    private void Build(KernelImage kernel, InitrdImage? initrd, List<IBlockDevice> disks, CpuTemplate template, int consoleOutFd, int consoleInFd)
    {
        _consoleOutFd = consoleOutFd;
        for (int i = 0; i < Memory.Regions.Count; i++)
        {
            var r = Memory.Regions[i];
            _vmFd.SetUserMemoryRegion((uint)i, r.Start.Value, r.Size, r.HostAddressForKvm);
        }
        TryHost(() => _vmFd.SetIdentityMapAddress(IdentityMapAddress), "KVM_SET_IDENTITY_MAP_ADDR");
        TryHost(() => _vmFd.SetTssAddress(TssAddress), "KVM_SET_TSS_ADDR");
        _vmFd.CreateIrqchip();
        _vmFd.CreatePit2();

        // Legacy devices (docs: src/KvmSharp.Devices/README.md has the port map).
        var serialIrq = new IrqfdLine(Libc.EventFd(), SerialGsi);
        _owned.Add(serialIrq);
        _vmFd.RegisterIrqfd(serialIrq.Fd, SerialGsi);
        _serial = new Serial8250(serialIrq, new ConsoleOutput(consoleOutFd, _panic));
        PioBus.Insert(_serial, 0x3F8, 8);
        var i8042 = new I8042(() => RequestStop(VmExit.Of(VmExitKind.GuestReboot, "guest reset the CPU through the i8042")));
        PioBus.Insert(i8042.DataPort, 0x60, 1);
        PioBus.Insert(i8042.CommandPort, 0x64, 1);
        ulong below4g = Math.Min(Config.MemoryBytes, MemoryLayout.MmioHoleStart);
        PioBus.Insert(new CmosRtc(() => DateTime.UtcNow, below4g, Config.MemoryBytes - below4g), 0x70, 2);
        // Port 0x80 is Linux's io_delay port: accept and ignore writes instead of logging each one.
        PioBus.Insert(new NullDevice(), 0x80, 1);
        if (Config.DebugExit)
            PioBus.Insert(new DebugExit(v => RequestStop(VmExit.Of(VmExitKind.DebugExit, $"guest wrote 0x{v:x} to the debug-exit port", v))), 0xF4, 1);

        ulong? rsdp = Config.Acpi ? BuildPlatform() : null;
        AddVirtioDevices(disks);

        string commandLine = Config.CommandLine + _mmioCommandLine;
        EffectiveCommandLine = IsPvm ? PvmCompat.AdjustCommandLine(commandLine, template, _diagnostics) : commandLine;
        Boot = LinuxLoader.Load(Memory, kernel, new BootOptions
        {
            CommandLine = EffectiveCommandLine,
            Initrd = initrd,
            CpuCount = Config.CpuCount,
            DecompressInVmm = Config.DecompressInVmm,
            PreferPvh = Config.PreferPvh,
            AcpiRsdpAddress = rsdp,
        });

        var supported = _kvm.GetSupportedCpuid();
        var hook = new PvmHook();
        for (int id = 0; id < Config.CpuCount; id++)
        {
            var vcpu = _vmFd.CreateVcpu(id);
            _vcpus.Add(vcpu);
            VcpuSetup.SetCpuid(vcpu, supported, Config.CpuCount, template);
            var refused = VcpuSetup.SetMsrs(vcpu);
            if (refused.Count > 0 && id == 0)
                _diagnostics.WriteLine($"kvmsharp: the host refused MSRs {string.Join(", ", refused.Select(m => $"0x{m:x}"))}; continuing without them");
            VcpuSetup.SetLint(vcpu);
            if (id == 0)
                VcpuSetup.SetBootRegisters(vcpu, Boot);
            _runners.Add(new VcpuRunner(this, vcpu, IsPvm ? new PvmCompat(vcpu, Memory, hook) : null));
        }

        Func<ReadOnlySpan<byte>, int> deliver = _virtioConsole is { } hvc ? data => hvc.EnqueueInput(data) : data => _serial.EnqueueInput(data);
        _input = new ConsoleInput(consoleInFd, EventLoop, deliver, () => RequestStop(VmExit.Of(VmExitKind.UserQuit, "quit from the console (Ctrl-A x)")));
    }

    /// <summary>
    /// ACPI tables, the ACPI PM and reset registers and the PCI host bridge (mechanism #1 and ECAM),
    /// whose virtio-pci devices get their queue kicks on ioeventfds served by the I/O thread.
    /// Returns the RSDP address for the zero page.
    /// </summary>
    private ulong BuildPlatform()
    {
        ulong rsdp = AcpiTables.Write(Memory, new AcpiConfig(Config.CpuCount, Config.MemoryBytes));
        PioBus.Insert(new AcpiPm(() => RequestStop(VmExit.Of(VmExitKind.GuestPowerOff, "guest powered off (ACPI S5)"))),
            PlatformLayout.Pm1aEventBlock, PlatformLayout.AcpiPmPortCount);
        var reset = new ResetControl(() => RequestStop(VmExit.Of(VmExitKind.GuestReboot, "guest reset through the ACPI reset register")));

        var notifier = new VirtioNotifier();
        _virtioNotifier = notifier;
        var pci = new PciRoot(MmioBus, PioBus, notifier);
        PioBus.Insert(reset.CombineWithPciConfigIo(pci.ConfigIo), PciRoot.ConfigIoBase, PciRoot.ConfigIoLength);
        MmioBus.Insert(pci.Ecam, PlatformLayout.EcamBase, PlatformLayout.EcamSize);

        _pci = pci;
        _msi = new KvmMsiRoutes(_vmFd, _diagnostics);
        _owned.Add(_msi);
        return rsdp;
    }

    /// <summary>The virtio devices of the config, on virtio-pci or (opt-in) virtio-mmio.</summary>
    private void AddVirtioDevices(List<IBlockDevice> disks)
    {
        if (Config.Rng)
            AddVirtio(new VirtioRng(log: _log));
        for (int i = 0; i < Config.Disks.Count; i++)
        {
            var d = Config.Disks[i];
            var blk = new VirtioBlock(disks[i], d.Serial, d.ReadOnly, log: _log);
            _owned.Insert(0, blk); // its worker stops before the disks close
            AddVirtio(blk);
        }
        if (Config.BalloonMiB is { } balloonMiB)
        {
            // No DEFLATE_ON_OOM (as Firecracker's default): inflated pages leave the guest's MemTotal, so
            // the guest sees the size the host chose, and it cannot take them back behind the host's back.
            Balloon = new VirtioBalloon(deflateOnOom: false, log: _log);
            Balloon.SetTargetPages(checked((uint)(balloonMiB * 256)));
            AddVirtio(Balloon);
        }
        if (Config.VirtioConsole)
        {
            _virtioConsole = new VirtioConsole(new ConsoleOutput(_consoleOutFd, _panic), log: _log);
            AddVirtio(_virtioConsole);
        }
        foreach (var n in Config.Nets)
        {
            var tap = TapNetBackend.Open(n.Tap);
            _owned.Add(tap);
            var net = new VirtioNet(tap, n.Mac, log: _log);
            AddVirtio(net);
            EventLoop.Add(tap.Fd, Libc.EPOLLIN | EpollEdgeTriggered, new NetPump(net));
            _diagnostics.WriteLine($"kvmsharp: virtio-net on TAP {tap.InterfaceName}, MAC {Convert.ToHexString(n.Mac).ToLowerInvariant()}");
        }
    }

    private EventLoop EventLoop => _eventLoop ??= new EventLoop { OnError = e => RequestStop(VmExit.Of(VmExitKind.VmmError, $"I/O thread: {e.Message}")) };

    private void AddVirtio(IVirtioDevice device)
    {
        if (Config.VirtioMmio)
            AddVirtioMmio(device);
        else
            AddVirtioPci(_pci!, _msi!, device);
    }

    /// <summary>
    /// A virtio-mmio device: 4 KiB at the next slot above <see cref="PlatformLayout.VirtioMmioBase"/>,
    /// its own ISA IRQ as an irqfd edge, announced with virtio_mmio.device= (virtio 1.2 §4.2;
    /// Linux's VIRTIO_MMIO_CMDLINE_DEVICES).
    /// </summary>
    private void AddVirtioMmio(IVirtioDevice device)
    {
        var irqs = PlatformLayout.VirtioMmioIrqs;
        if (_mmioDevices >= irqs.Length)
            throw new VmConfigException($"At most {irqs.Length} virtio-mmio devices fit this platform's free IRQs.");
        ulong address = PlatformLayout.VirtioMmioBase + (ulong)_mmioDevices * VirtioMmioTransport.RegionSize;
        uint gsi = irqs[_mmioDevices++];
        var irq = new IrqfdLine(Libc.EventFd(), gsi);
        _owned.Add(irq);
        _vmFd.RegisterIrqfd(irq.Fd, gsi);
        var events = new VirtioQueueEvents(_vmFd, EventLoop, device.QueueCount, _diagnostics);
        _owned.Add(events);
        var transport = new VirtioMmioTransport(device, Memory, irq, events);
        events.Attach(transport);
        // One QueueNotify register for all queues: the written value is the queue index (virtio 1.2 §4.2.2).
        events.AssignIoeventfds(address + VirtioMmioTransport.QueueNotifyOffset, stride: 0, width: 4, matchQueueIndex: true);
        MmioBus.Insert(transport, address, VirtioMmioTransport.RegionSize);
        _mmioCommandLine += $" virtio_mmio.device=4K@0x{address:x}:{gsi}";
    }

    private void AddVirtioPci(PciRoot pci, IMsiSink msi, IVirtioDevice device)
    {
        ulong bar0 = AllocateBar(VirtioPciTransport.Bar0Size);
        ulong bar2 = AllocateBar(MsixTable.RegionSize);
        int slot = _nextSlot++; // 00:00.0 is the host bridge
        var intx = new KvmLevelLine(_vmFd, (uint)PlatformLayout.PciIntxGsi(slot, 0));
        var events = new VirtioQueueEvents(_vmFd, EventLoop, device.QueueCount, _diagnostics);
        _owned.Add(events);
        var transport = new VirtioPciTransport(device, Memory, msi, intx, events, bar0, bar2);
        events.Attach(transport);
        _virtioNotifier!.Track(transport, events); // its ioeventfds follow BAR 0
        pci.AddDevice(transport, slot);
    }

    private ulong AllocateBar(ulong size)
    {
        ulong address = (_nextBar + size - 1) & ~(size - 1); // BARs are naturally aligned (PCI LB 3.0 §6.2.5.1)
        if (address + size > PlatformLayout.Pci32WindowStart + PlatformLayout.Pci32WindowSize)
            throw new VmConfigException("Too many PCI devices for the 32-bit MMIO window.");
        _nextBar = address + size;
        return address;
    }

    private void TryHost(Action action, string what)
    {
        try
        {
            action();
        }
        catch (KvmException e)
        {
            // PVM and AMD hosts do not need these; a failure only matters to Intel VMX real mode.
            _diagnostics.WriteLine($"kvmsharp: {what} not available ({e.Message}); continuing");
        }
    }

    /// <summary>Runs the guest until it ends; returns why. Blocks the calling thread.</summary>
    public VmExit Run(CancellationToken cancel = default)
    {
        EnsureKickSignal();
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, ctx => { ctx.Cancel = true; RequestStop(VmExit.Of(VmExitKind.Signal, "SIGINT", 2)); });
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, ctx => { ctx.Cancel = true; RequestStop(VmExit.Of(VmExitKind.Signal, "SIGTERM", 15)); });
        using var reg = cancel.Register(() => RequestStop(VmExit.Of(VmExitKind.Signal, "cancelled", 15)));

        _input?.Start();
        _eventLoop?.Start();
        foreach (var r in _runners)
            r.Start();
        if (IsPvm)
        {
            // vCPU 0 installs the PVM #PF hook when kicked; poll until the guest runs user code, then slowly.
            _pvmPoller = new Timer(_ => { if (!StopRequested) _runners[0].Kick(); }, null, TimeSpan.FromMilliseconds(200), TimeSpan.FromMilliseconds(200));
        }
        _stopped.Wait(CancellationToken.None);
        _pvmPoller?.Dispose();
        foreach (var r in _runners)
            r.Kick();
        foreach (var r in _runners)
            r.Join();
        _input?.Dispose();
        _eventLoop?.Dispose();

        var exit = _exit;
        // A panic that the guest turned into a reboot (panic=N) is still a panic.
        if (_panic.Seen && exit.Kind is VmExitKind.GuestReboot or VmExitKind.GuestPowerOff)
            exit = VmExit.Of(VmExitKind.GuestPanic, "guest kernel panicked (\"Kernel panic - not syncing\" on the console), then " + exit.Detail);
        return exit;
    }

    private static PosixSignalRegistration? s_kickSignal;

    /// <summary>
    /// SIGUSR2 kicks vCPU threads out of KVM_RUN (never SIGRTMIN, which CoreCLR uses). Registered once
    /// for the life of the process: a kick still in flight when a VM ends must not meet the default
    /// action (terminate), which is what disposing the registration would restore.
    /// </summary>
    private static void EnsureKickSignal()
    {
        if (Volatile.Read(ref s_kickSignal) is null)
        {
            var reg = PosixSignalRegistration.Create((PosixSignal)Libc.SIGUSR2, ctx => ctx.Cancel = true);
            if (Interlocked.CompareExchange(ref s_kickSignal, reg, null) is not null)
                reg.Dispose();
        }
    }

    /// <summary>Statistics for diagnostics and tests.</summary>
    public (long Exits, long PvmEmulated, long PvmSyscalls, long PvmPageFaults) Stats()
    {
        long exits = 0, emu = 0, sys = 0, pf = 0;
        foreach (var r in _runners)
        {
            exits += r.Exits;
            emu += r.Pvm?.EmulatedInstructions ?? 0;
            sys += r.Pvm?.SyscallsCompleted ?? 0;
            pf += r.Pvm?.PageFaultHookHits ?? 0;
        }
        return (exits, emu, sys, pf);
    }

    /// <summary>Ends the VM with <paramref name="exit"/>; the first request wins. Safe from any thread.</summary>
    public void RequestStop(VmExit exit)
    {
        if (Interlocked.CompareExchange(ref _stopRequested, 1, 0) != 0)
            return;
        _exit = exit;
        foreach (var r in _runners)
            r.Kick();
        _stopped.Set();
    }

    internal void LogUnclaimed(string what, ulong address) => _log.Write($"kvmsharp: unclaimed {what} at 0x{address:x}");

    public void Dispose()
    {
        _pvmPoller?.Dispose();
        _input?.Dispose();
        _eventLoop?.Dispose();
        foreach (var v in _vcpus)
            v.Dispose();
        foreach (var o in _owned)
            o.Dispose();
        _vmFd.Dispose();
        Memory.Dispose();
        _kvm.Dispose();
        _stopped.Dispose();
    }

    /// <summary>Claims a port range and ignores it (port 0x80 io_delay).</summary>
    private sealed class NullDevice : IBusDevice
    {
        public void Read(ulong offset, Span<byte> data) => data.Fill(0xFF);
        public void Write(ulong offset, ReadOnlySpan<byte> data) { }
    }
}
