namespace KvmSharp.Boot;

/// <summary>How the vCPU must be started to enter the kernel.</summary>
public enum BootEntryMode
{
    /// <summary>
    /// Linux 64-bit boot protocol (boot.rst "64-bit BOOT PROTOCOL"): long mode, paging on with the
    /// identity map at <see cref="BootResult.PageTableBase"/> (CR3), CR0 = PE|PG (|ET|NE), CR4 = PAE,
    /// EFER = LME|LMA, CS = <see cref="BootResult.CodeSelector"/> (L=1), DS/ES/FS/GS/SS =
    /// <see cref="BootResult.DataSelector"/>, TR = <see cref="BootResult.TssSelector"/>,
    /// RIP = entry, RSI = zero page, RSP = stack pointer, RFLAGS = 0x2 (interrupts off).
    /// </summary>
    Long64,

    /// <summary>
    /// Xen PVH direct boot (xen docs/misc/pvh.pandoc): 32-bit protected mode, paging off, CR0 = PE (|ET),
    /// CR4 = 0, EFER = 0, flat 4 GiB CS/DS/ES/SS from the GDT, TR = 32-bit TSS, EIP = entry,
    /// EBX = hvm_start_info, RFLAGS = 0x2.
    /// </summary>
    Pvh32,
}

/// <summary>What to boot with the kernel.</summary>
public sealed record BootOptions
{
    /// <summary>Kernel command line (ASCII, no NUL); at most <see cref="KernelImage.CommandLineMax"/> bytes.</summary>
    public string CommandLine { get; init; } = "";

    /// <summary>Initial ramdisk (a file read straight into guest memory, or bytes); null or empty for none.
    /// The caller owns it and disposes it after <see cref="LinuxLoader.Load"/>.</summary>
    public InitrdImage? Initrd { get; init; }

    /// <summary>vCPUs described in the MP table (1 to <see cref="MpTable.MaxCpus"/>).</summary>
    public int CpuCount { get; init; } = 1;

    /// <summary>
    /// For a bzImage, load its payload decompressed by the VMM as an ELF (the default: the guest's own
    /// decompressor is far too slow where ring 0 is emulated) instead of entering the compressed kernel.
    /// </summary>
    public bool DecompressInVmm { get; init; } = true;

    /// <summary>Enter through the PVH note when the kernel has one; otherwise (or when false) the 64-bit entry is used.</summary>
    public bool PreferPvh { get; init; }

    /// <summary>
    /// Physical address of the ACPI RSDP when the VMM writes ACPI tables: passed as
    /// hvm_start_info.rsdp_paddr (PVH) and boot_params.acpi_rsdp_addr (zero page, protocol 2.14+).
    /// Null: none given; Linux then scans the EBDA and 0xE0000–0xFFFFF itself.
    /// </summary>
    public ulong? AcpiRsdpAddress { get; init; }

    /// <summary>Write the MP table for <see cref="CpuCount"/> CPUs (on by default; turn off when ACPI tables describe the CPUs).</summary>
    public bool WriteMpTable { get; init; } = true;
}

/// <summary>
/// Where the kernel is and how to enter it. The VMM turns this into kvm_regs/kvm_sregs; see
/// <see cref="BootEntryMode"/> for the register state each mode needs.
/// </summary>
/// <param name="Mode">Entry mode.</param>
/// <param name="EntryPoint">Physical RIP/EIP.</param>
/// <param name="BootInfoAddress">Zero page (RSI) for Long64; hvm_start_info (EBX) for Pvh32.</param>
/// <param name="PageTableBase">CR3 for Long64; 0 for Pvh32 (paging off).</param>
/// <param name="GdtBase">GDTR base.</param>
/// <param name="GdtLimit">GDTR limit.</param>
/// <param name="StackPointer">Initial RSP/ESP.</param>
public sealed record BootResult(BootEntryMode Mode, ulong EntryPoint, ulong BootInfoAddress, ulong PageTableBase, ulong GdtBase, ushort GdtLimit, ulong StackPointer)
{
    /// <summary>CR0 for the entry: PG|ET|PE (0x80000011) for Long64, ET|PE (0x11) for Pvh32. The kernel sets the rest itself.</summary>
    public ulong Cr0 => Mode == BootEntryMode.Long64 ? 0x80000011UL : 0x11UL;

    /// <summary>CR4 for the entry: PAE (0x20) for Long64, 0 for Pvh32.</summary>
    public ulong Cr4 => Mode == BootEntryMode.Long64 ? 0x20UL : 0UL;

    /// <summary>EFER for the entry: LME|LMA (0x500) for Long64, 0 for Pvh32.</summary>
    public ulong Efer => Mode == BootEntryMode.Long64 ? 0x500UL : 0UL;

    /// <summary>RFLAGS for the entry: only the always-one bit 1 (interrupts off).</summary>
    [System.Diagnostics.CodeAnalysis.SuppressMessage("Performance", "CA1822", Justification = "Part of the entry register set beside Efer; callers read it from the options.")]
    public ulong Rflags => 0x2;

    /// <summary>The descriptors written at <see cref="GdtBase"/>, index = selector / 8.</summary>
    public IReadOnlyList<ulong> GdtEntries { get; init; } = [];

    public ushort CodeSelector { get; init; }
    public ushort DataSelector { get; init; }
    public ushort TssSelector { get; init; }

    /// <summary>Decoded descriptors for kvm_segment.</summary>
    public SegmentDescriptor CodeSegment => SegmentDescriptor.Decode(GdtEntries[CodeSelector >> 3]);
    public SegmentDescriptor DataSegment => SegmentDescriptor.Decode(GdtEntries[DataSelector >> 3]);
    public SegmentDescriptor TssSegment => SegmentDescriptor.Decode(GdtEntries[TssSelector >> 3]);

    /// <summary>Exclusive end of the memory the kernel occupies.</summary>
    public ulong KernelEnd { get; init; }

    /// <summary>Initrd placement (0, 0 when none).</summary>
    public ulong InitrdAddress { get; init; }
    public ulong InitrdSize { get; init; }

    /// <summary>The memory map given to the kernel.</summary>
    public IReadOnlyList<E820Entry> MemoryMap { get; init; } = [];
}
