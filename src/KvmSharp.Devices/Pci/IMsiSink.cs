namespace KvmSharp.Devices.Pci;

/// <summary>
/// Where MSI/MSI-X messages go; the VMM implements it. Thread-safe, never blocks, never throws.
/// </summary>
public interface IMsiSink
{
    /// <summary>
    /// Delivers one message: the guest-programmed address and data (PCI LB 3.0 §6.8.2.6-8). The slow
    /// path (KVM_SIGNAL_MSI): used for vectors that have no <see cref="IMsiVector"/>.
    /// </summary>
    void Deliver(ulong address, uint data);

    /// <summary>
    /// A vector of its own (a GSI route plus an irqfd), so that raising it is one eventfd write; or
    /// null when the sink has none left (every message then goes through <see cref="Deliver"/>).
    /// Called once per MSI-X table entry, when the table is created.
    /// </summary>
    IMsiVector? CreateVector() => null;
}
