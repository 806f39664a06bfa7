namespace KvmSharp.Vmm;

/// <summary>Everything needed to build and run one VM. Validated by <see cref="Validate"/>.</summary>
public sealed record VmConfig
{
    public const int MaxVcpus = 64;

    public required string KernelPath { get; init; }
    public string? InitrdPath { get; init; }
    public string CommandLine { get; init; } = "console=ttyS0";
    public int CpuCount { get; init; } = 1;
    public ulong MemoryBytes { get; init; } = 256UL << 20;

    /// <summary>CPU features hidden from the guest, as text (<see cref="Boot.CpuTemplate.Parse"/>; checked by
    /// <see cref="CheckValues"/>). On a PVM host they are hidden with kernel parameters instead, together
    /// with the PVM template (docs/pvm.md).</summary>
    public string CpuTemplate { get; init; } = "none";

    /// <summary>Decompress a bzImage's payload in the VMM instead of running the kernel's own decompressor.</summary>
    public bool DecompressInVmm { get; init; } = true;

    /// <summary>Enter through the PVH entry point (32-bit) instead of the 64-bit boot protocol.</summary>
    public bool PreferPvh { get; init; }

    /// <summary>PVM compatibility: null = detect (on when /dev/kvm is kvm_pvm).</summary>
    public bool? PvmCompat { get; init; }

    /// <summary>Map QEMU's isa-debug-exit at port 0xf4: a write of v ends the VM with exit code (v &lt;&lt; 1) | 1.</summary>
    public bool DebugExit { get; init; }

    /// <summary>ACPI tables and the PCI host bridge (off: MP table only, no PCI devices).</summary>
    public bool Acpi { get; init; } = true;

    /// <summary>A virtio-rng device (host entropy).</summary>
    public bool Rng { get; init; }

    /// <summary>virtio-blk devices.</summary>
    public IReadOnlyList<DiskConfig> Disks { get; init; } = [];

    /// <summary>virtio-balloon with this initial target (MiB taken from the guest); null for none.</summary>
    public ulong? BalloonMiB { get; init; }

    /// <summary>Console on virtio-console (hvc0) instead of the UART's input; the UART still prints.</summary>
    public bool VirtioConsole { get; init; }

    /// <summary>virtio-net devices, each on a TAP interface.</summary>
    public IReadOnlyList<NetConfig> Nets { get; init; } = [];

    /// <summary>Put the virtio devices on virtio-mmio (virtio 1.2 §4.2, announced on the kernel command
    /// line) instead of virtio-pci.</summary>
    public bool VirtioMmio { get; init; }

    public bool Mergeable { get; init; }
    public bool HugePages { get; init; }

    /// <summary>Populate guest RAM before the guest starts (see GuestMemoryOptions.Prefault).</summary>
    public bool Prefault { get; init; }

    /// <summary>
    /// The first setting that is out of range or inconsistent with another (vCPUs, memory, balloon
    /// against memory, the CPU template, virtio devices without PCI), or null when all are usable.
    /// Arithmetic and parsing only, no files and no KVM, and overflow-safe for any value, so a front end
    /// can report it as a usage error before anything is opened, in its own terms (see
    /// <see cref="VmConfigProblem"/>: the problem names the property, not a flag or a JSON key).
    /// </summary>
    public VmConfigProblem? CheckValues()
    {
        if (CpuCount < 1 || CpuCount > MaxVcpus)
            return new(nameof(CpuCount), $"must be from 1 to {MaxVcpus}, not {CpuCount}");
        if (MemoryBytes < MinMemoryBytes || MemoryBytes > MaxMemoryBytes || MemoryBytes % 4096 != 0)
            return new(nameof(MemoryBytes), $"must be a multiple of 4 KiB between 16 MiB and 1 TiB, not {MemoryBytes} bytes");
        // b MiB >= memory, without computing b << 20 (which wraps for b >= 2^44 and let 16 TiB through).
        if (BalloonMiB is { } b && b > (MemoryBytes - 1) >> 20)
            return new(nameof(BalloonMiB), $"{b} MiB would take all of the guest's {MemoryBytes >> 20} MiB");
        try
        {
            Boot.CpuTemplate.Parse(CpuTemplate);
        }
        catch (FormatException e)
        {
            return new(nameof(CpuTemplate), e.Message);
        }
        if (!Acpi && !VirtioMmio && (Rng || Nets.Count > 0 || Disks.Count > 0 || BalloonMiB.HasValue || VirtioConsole))
            return new(nameof(Acpi), "off leaves no PCI bus for the virtio devices: turn ACPI on, or put the devices on virtio-mmio");
        return null;
    }

    /// <summary>16 MiB: below this a Linux guest does not boot; 1 TiB: above it, the memory map's arithmetic is untested.</summary>
    public const ulong MinMemoryBytes = 16UL << 20, MaxMemoryBytes = 1UL << 40;

    /// <summary>Throws <see cref="VmConfigException"/> with one clear sentence when the config cannot work.</summary>
    /// <exception cref="VmConfigException">A value is unusable (<see cref="CheckValues"/>), or a kernel, initrd or disk image does not exist.</exception>
    public void Validate()
    {
        if (CheckValues() is { } problem)
            throw new VmConfigException($"{problem}.");
        if (!File.Exists(KernelPath))
            throw new VmConfigException($"Kernel file {KernelPath} does not exist.");
        if (InitrdPath is not null && !File.Exists(InitrdPath))
            throw new VmConfigException($"Initrd file {InitrdPath} does not exist.");
        foreach (var d in Disks)
        {
            if (!File.Exists(d.Path))
                throw new VmConfigException($"Disk image {d.Path} does not exist.");
        }
    }
}

/// <summary>A VM configuration that cannot work; the message is one sentence for the user.</summary>
public sealed class VmConfigException : Exception
{
    public VmConfigException() { }
    public VmConfigException(string message) : base(message) { }
    public VmConfigException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>One virtio-net device: attach to (or create) TAP <see cref="Tap"/>; null lets the kernel name it.</summary>
public sealed record NetConfig(string? Tap, byte[] Mac);

/// <summary>One virtio-blk device over a raw or qcow2 image.</summary>
public sealed record DiskConfig(string Path, bool ReadOnly, string Serial, string? Format);
