namespace KvmSharp.Vmm;

/// <summary>Where a <see cref="Vm"/> is in its life (design.md: lifecycle).</summary>
/// <remarks>
/// <code>
/// Created ──build──► Configured ──Run──► Running ⇄ Paused
///    └──────────────────┴─────────────────┴──────┴──► Stopped (a stop request, from any state)
/// </code>
/// </remarks>
public enum VmState
{
    /// <summary>KVM objects and memory exist; devices and vCPUs are being set up.</summary>
    Created,

    /// <summary>Built: devices wired, kernel loaded, vCPUs set up; no thread runs the guest yet.</summary>
    Configured,

    /// <summary>vCPU threads run the guest.</summary>
    Running,

    /// <summary>Every vCPU thread is out of KVM_RUN and parked; the guest does not execute.</summary>
    Paused,

    /// <summary>A stop was requested; the vCPU threads end (or never start).</summary>
    Stopped,
}
