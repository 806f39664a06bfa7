namespace KvmSharp.Devices;

/// <summary>
/// An edge-triggered interrupt line into the guest. The VMM implements it with a KVM irqfd (an
/// eventfd write), so <see cref="Trigger"/> is cheap, never blocks and may be called from any
/// thread (vm-superio lib.rs <c>Trigger</c>).
/// </summary>
/// <remarks>
/// Each call is one edge. A device that models a level-sensitive source on such a line must call
/// <see cref="Trigger"/> whenever its condition becomes pending (see <see cref="Serial8250"/>).
/// Implementations must not throw on the hot path; a failed eventfd write is the VMM's to log.
/// </remarks>
public interface IInterruptLine
{
    /// <summary>Raises one interrupt edge.</summary>
    void Trigger();
}
