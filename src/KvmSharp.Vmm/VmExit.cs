namespace KvmSharp.Vmm;

/// <summary>
/// Why a VM ended, and the process exit code for it. Documented in docs/exit-codes.md; 0 only when
/// the guest itself rebooted, powered off or halted (as Firecracker does).
/// </summary>
public enum VmExitKind
{
    /// <summary>Guest rebooted (i8042 reset, KVM reset event) — exit code 0.</summary>
    GuestReboot,
    /// <summary>Guest powered off or halted — exit code 0.</summary>
    GuestPowerOff,
    /// <summary>Guest kernel panicked — exit code 3.</summary>
    GuestPanic,
    /// <summary>Triple fault (KVM_EXIT_SHUTDOWN) — exit code 4.</summary>
    TripleFault,
    /// <summary>KVM_EXIT_INTERNAL_ERROR not handled, KVM_EXIT_FAIL_ENTRY, or an unknown exit — exit code 5.</summary>
    InternalError,
    /// <summary>The VMM itself failed while running (a host call failed) — exit code 1.</summary>
    VmmError,
    /// <summary>The user pressed Ctrl-A x — exit code 130.</summary>
    UserQuit,
    /// <summary>SIGINT or SIGTERM — exit code 128 + signal.</summary>
    Signal,
    /// <summary>Guest wrote to the debug-exit port — exit code (value &lt;&lt; 1) | 1, as QEMU's isa-debug-exit.</summary>
    DebugExit,
}

/// <summary>The outcome of a VM run.</summary>
public readonly record struct VmExit(VmExitKind Kind, int Code, string Detail)
{
    public static VmExit Of(VmExitKind kind, string detail, int value = 0) => new(kind, CodeFor(kind, value), detail);

    private static int CodeFor(VmExitKind kind, int value) => kind switch
    {
        VmExitKind.GuestReboot or VmExitKind.GuestPowerOff => 0,
        VmExitKind.VmmError => 1,
        VmExitKind.GuestPanic => 3,
        VmExitKind.TripleFault => 4,
        VmExitKind.InternalError => 5,
        VmExitKind.UserQuit => 130,
        VmExitKind.Signal => 128 + value,
        VmExitKind.DebugExit => (value << 1) | 1,
        _ => 1,
    };
}
