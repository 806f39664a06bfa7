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

    /// <summary>Named CPU template (see KvmSharp.Boot.CpuTemplate).</summary>
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
    /// The first number that is out of range or inconsistent with another (vCPUs, memory, balloon
    /// against memory), as one sentence naming the option; null when they are all usable. Arithmetic
    /// only, no files and no KVM, and overflow-safe for any value, so a front end can report it as a
    /// usage error before anything is opened.
    /// </summary>
    public string? CheckValues()
    {
        if (CpuCount < 1 || CpuCount > MaxVcpus)
            return $"--cpus must be between 1 and {MaxVcpus}, not {CpuCount}.";
        if (MemoryBytes < (16UL << 20) || MemoryBytes > (1UL << 40) || MemoryBytes % 4096 != 0)
            return $"--memory must be a multiple of 4 KiB between 16 MiB and 1 TiB, not {MemoryBytes} bytes.";
        // b MiB >= memory, without computing b << 20 (which wraps for b >= 2^44 and let 16 TiB through).
        if (BalloonMiB is { } b && b > (MemoryBytes - 1) >> 20)
            return $"--balloon {b} MiB would take all of the guest's {MemoryBytes >> 20} MiB.";
        return null;
    }

    /// <summary>Throws <see cref="VmConfigException"/> with one clear sentence when the config cannot work.</summary>
    public void Validate()
    {
        if (CheckValues() is { } problem)
            throw new VmConfigException(problem);
        if (!File.Exists(KernelPath))
            throw new VmConfigException($"Kernel file {KernelPath} does not exist.");
        if (InitrdPath is not null && !File.Exists(InitrdPath))
            throw new VmConfigException($"Initrd file {InitrdPath} does not exist.");
        foreach (var d in Disks)
        {
            if (!File.Exists(d.Path))
                throw new VmConfigException($"Disk image {d.Path} does not exist.");
        }
        if (!Acpi && !VirtioMmio && (Rng || Nets.Count > 0 || Disks.Count > 0 || BalloonMiB.HasValue || VirtioConsole))
            throw new VmConfigException("Virtio-pci devices need PCI, which comes with ACPI: drop --no-acpi or use --transport mmio.");
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
