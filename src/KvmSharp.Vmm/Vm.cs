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
using KvmSharp.Vmm.Interrupts;
using KvmSharp.Vmm.Platform;
using KvmSharp.Vmm.Pvm;
using KvmSharp.Vmm.Virtio;

namespace KvmSharp.Vmm;

/// <summary>
/// One VM: KVM objects, guest RAM, its devices (a <see cref="DeviceManager"/> on the machine
/// layout, <see cref="PlatformLayout"/>), and one thread per vCPU. Built by <see cref="Create"/>
/// (state <see cref="VmState.Configured"/>); <see cref="Run"/> blocks until the guest or the user
/// ends it; <see cref="Pause"/> and <see cref="Resume"/> may be called meanwhile from another
/// thread, and <see cref="RequestStop"/> from any thread in any state (<see cref="VmLifecycle"/>).
/// </summary>
public sealed class Vm : IDisposable
{
    private const uint EpollEdgeTriggered = 1u << 31; // EPOLLET

    private readonly KvmSystem _kvm;
    private readonly KvmVm _vmFd;
    private readonly List<KvmVcpu> _vcpus = [];
    private readonly List<VcpuRunner> _runners = [];
    private readonly List<IDisposable> _owned = [];
    private readonly VmLifecycle _lifecycle;
    private readonly KvmInterruptController _interrupts;
    private readonly DeviceManager _devices;
    private readonly RateLimitedLog _log;
    private readonly PanicDetector _panic = new();
    private readonly TextWriter _diagnostics;
    private Serial8250 _serial = null!;
    private ConsoleInput? _input;
    private Timer? _pvmPoller;
    private EventLoop? _eventLoop;
    private VirtioConsole? _virtioConsole;
    private int _consoleOutFd = 1;

    private Vm(VmConfig config, KvmSystem kvm, KvmVm vmFd, GuestMemory memory, TextWriter diagnostics)
    {
        Config = config;
        _kvm = kvm;
        _vmFd = vmFd;
        Memory = memory;
        _diagnostics = diagnostics;
        _log = new RateLimitedLog(diagnostics, burst: 20, period: TimeSpan.FromSeconds(10));
        _lifecycle = new VmLifecycle(KickAll);
        _interrupts = new KvmInterruptController(new KvmIrqRouting(vmFd), () => EventLoop, diagnostics);
        _devices = new DeviceManager(memory, _interrupts, RequestStop, vmFd, () => EventLoop, diagnostics);
    }

    public VmConfig Config { get; }
    public GuestMemory Memory { get; }
    public Bus PioBus => _devices.PioBus;
    public Bus MmioBus => _devices.MmioBus;

    /// <summary>Where the VM is in its life.</summary>
    public VmState State => _lifecycle.State;

    /// <summary>The devices as placed (for state save and tests).</summary>
    internal IReadOnlyList<DeviceInfo> Devices => _devices.Devices;
    public bool IsPvm { get; private init; }
    public BootResult Boot { get; private set; } = null!;
    public string EffectiveCommandLine { get; private set; } = "";

    /// <summary>The virtio-balloon, when configured: <see cref="VirtioBalloon.SetTargetPages"/> resizes it.</summary>
    public VirtioBalloon? Balloon { get; private set; }

    internal bool StopRequested => _lifecycle.StopRequested;

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
            vm._lifecycle.Configured();
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
        TryHost(() => _vmFd.SetIdentityMapAddress(PlatformLayout.IdentityMapAddress), "KVM_SET_IDENTITY_MAP_ADDR");
        TryHost(() => _vmFd.SetTssAddress(PlatformLayout.TssAddress), "KVM_SET_TSS_ADDR");
        _vmFd.CreateIrqchip();
        _vmFd.CreatePit2();

        // Every device goes where the machine layout says (PlatformLayout), as the ACPI and MP tables tell the guest.
        _serial = _devices.AddLegacyDevices(new ConsoleOutput(consoleOutFd, _panic), Config.MemoryBytes, Config.DebugExit);
        ulong? rsdp = null;
        if (Config.Acpi)
        {
            rsdp = AcpiTables.Write(Memory, new AcpiConfig(Config.CpuCount, Config.MemoryBytes));
            _devices.AddAcpiPlatform();
        }
        AddVirtioDevices(disks);

        string commandLine = Config.CommandLine + _devices.MmioCommandLine;
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
        var context = new VcpuContext(PioBus, MmioBus, Memory, _lifecycle, _log);
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
            _runners.Add(new VcpuRunner(context, vcpu, IsPvm ? new PvmCompat(vcpu, Memory, hook) : null));
        }

        Func<ReadOnlySpan<byte>, int> deliver = _virtioConsole is { } hvc ? data => hvc.EnqueueInput(data) : data => _serial.EnqueueInput(data);
        _input = new ConsoleInput(consoleInFd, EventLoop, deliver, () => RequestStop(VmExit.Of(VmExitKind.UserQuit, "quit from the console (Ctrl-A x)")));
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
            _devices.Own(tap);
            var net = new VirtioNet(tap, n.Mac, log: _log);
            AddVirtio(net);
            EventLoop.Add(tap.Fd, Libc.EPOLLIN | EpollEdgeTriggered, new NetPump(net));
            _diagnostics.WriteLine($"kvmsharp: virtio-net on TAP {tap.InterfaceName}, MAC {Convert.ToHexString(n.Mac).ToLowerInvariant()}");
        }
    }

    private EventLoop EventLoop => _eventLoop ??= new EventLoop { OnError = e => RequestStop(VmExit.Of(VmExitKind.VmmError, $"I/O thread: {e.Message}")) };

    private void AddVirtio(IVirtioDevice device) => _devices.AddVirtio(device, Config.VirtioMmio);

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

        if (!_lifecycle.Start(_runners.Count))
            return Finish(); // stopped before it ran
        _input?.Start();
        _eventLoop?.Start();
        foreach (var r in _runners)
            r.Start();
        if (IsPvm)
        {
            // vCPU 0 installs the PVM #PF hook when kicked; poll until the guest runs user code, then slowly.
            _pvmPoller = new Timer(_ => { if (!StopRequested) _runners[0].Kick(); }, null, TimeSpan.FromMilliseconds(200), TimeSpan.FromMilliseconds(200));
        }
        _lifecycle.WaitForStop();
        _pvmPoller?.Dispose();
        KickAll();
        foreach (var r in _runners)
            r.Join();
        _input?.Dispose();
        _eventLoop?.Dispose();
        return Finish();
    }

    private VmExit Finish()
    {
        var exit = _lifecycle.Exit;
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

    /// <summary>Ends the VM with <paramref name="exit"/>, from any state; the first request wins. Safe from any thread.</summary>
    public void RequestStop(VmExit exit) => _lifecycle.RequestStop(exit);

    /// <summary>
    /// Stops the guest: every vCPU leaves KVM_RUN and parks, using no CPU, until <see cref="Resume"/>
    /// or a stop. Returns once all have parked. Devices and the I/O thread keep serving what is in
    /// flight. The guest's clock (kvmclock, from the host's) keeps running while paused.
    /// </summary>
    /// <exception cref="InvalidOperationException">The VM is not running.</exception>
    public void Pause() => _lifecycle.Pause();

    /// <summary>Lets the parked vCPUs run again.</summary>
    /// <exception cref="InvalidOperationException">The VM is not paused.</exception>
    public void Resume() => _lifecycle.Resume();

    private void KickAll()
    {
        foreach (var r in _runners)
            r.Kick();
    }

    public void Dispose()
    {
        _pvmPoller?.Dispose();
        _input?.Dispose();
        _eventLoop?.Dispose();
        foreach (var v in _vcpus)
            v.Dispose();
        _devices.Dispose();
        _interrupts.Dispose();
        foreach (var o in _owned)
            o.Dispose();
        _vmFd.Dispose();
        Memory.Dispose();
        _kvm.Dispose();
        _lifecycle.Dispose();
    }
}
