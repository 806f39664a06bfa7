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

/// <summary>
/// A level-sensitive interrupt line (PCI INTx, PCI LB 3.0 §2.2.6): asserted while the device's
/// interrupt condition holds. The VMM implements it with KVM_IRQ_LINE, or with an irqfd plus a
/// resample fd that re-asserts after the guest's EOI while the level is still high.
/// </summary>
/// <remarks>Called only on a change of level, from any thread, never concurrently for one line
/// (the device serialises its calls); must not block or call back into the device.</remarks>
public interface ILevelInterruptLine
{
    /// <summary>Drives the line: true = asserted, false = deasserted.</summary>
    void SetLevel(bool asserted);
}
