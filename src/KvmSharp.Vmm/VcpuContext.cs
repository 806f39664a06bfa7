using KvmSharp.Devices;
using KvmSharp.Memory;

namespace KvmSharp.Vmm;

/// <summary>
/// What a vCPU thread needs from its VM, and nothing more: the two buses its exits go to, guest
/// memory (for diagnostics), the lifecycle (stop and pause requests) and the rate-limited log for
/// unclaimed accesses. Keeps <see cref="VcpuRunner"/> from holding the whole <see cref="Vm"/>.
/// </summary>
internal sealed class VcpuContext(Bus pioBus, Bus mmioBus, GuestMemory memory, VmLifecycle lifecycle, RateLimitedLog log)
{
    public Bus PioBus { get; } = pioBus;
    public Bus MmioBus { get; } = mmioBus;
    public GuestMemory Memory { get; } = memory;
    public VmLifecycle Lifecycle { get; } = lifecycle;

    public bool StopRequested => Lifecycle.StopRequested;

    public void RequestStop(VmExit exit) => Lifecycle.RequestStop(exit);

    /// <summary>A guest access nothing claimed (the caller fills reads with 0xFF); suppressed lines allocate nothing.</summary>
    public void LogUnclaimed(string what, ulong address) => log.Write($"kvmsharp: unclaimed {what} at 0x{address:x}");
}
