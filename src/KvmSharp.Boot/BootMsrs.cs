namespace KvmSharp.Boot;

/// <summary>
/// MSR values a vCPU starts with for a Linux boot (as Firecracker's arch/x86_64/msr.rs and QEMU do):
/// SYSENTER/SYSCALL MSRs and KERNEL_GS_BASE zero, TSC zero, IA32_MISC_ENABLE with fast strings, and
/// MTRRs enabled with write-back as the default type (so the guest does not run uncached).
/// IA32_ARCH_CAPABILITIES (0x10a) is deliberately absent: writing it fails on a PVM host.
/// </summary>
public static class BootMsrs
{
    public const uint Ia32Tsc = 0x10;
    public const uint Ia32SysenterCs = 0x174;
    public const uint Ia32SysenterEsp = 0x175;
    public const uint Ia32SysenterEip = 0x176;
    public const uint Ia32MiscEnable = 0x1a0;
    public const uint Ia32MtrrDefType = 0x2ff;
    public const uint Star = 0xc0000081;
    public const uint Lstar = 0xc0000082;
    public const uint Cstar = 0xc0000083;
    public const uint SyscallMask = 0xc0000084;
    public const uint KernelGsBase = 0xc0000102;

    /// <summary>IA32_MISC_ENABLE bit 0: fast-string operation (rep movs/stos).</summary>
    public const ulong MiscEnableFastString = 1;

    /// <summary>IA32_MTRR_DEF_TYPE: E (bit 11) set, default memory type 6 = write-back.</summary>
    public const ulong MtrrDefTypeEnabledWriteBack = (1 << 11) | 6;

    public static IReadOnlyList<(uint Index, ulong Value)> Defaults { get; } =
    [
        (Ia32SysenterCs, 0),
        (Ia32SysenterEsp, 0),
        (Ia32SysenterEip, 0),
        (Star, 0),
        (Lstar, 0),
        (Cstar, 0),
        (SyscallMask, 0),
        (KernelGsBase, 0),
        (Ia32Tsc, 0),
        (Ia32MiscEnable, MiscEnableFastString),
        (Ia32MtrrDefType, MtrrDefTypeEnabledWriteBack),
    ];
}
