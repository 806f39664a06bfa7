namespace KvmSharp.Devices.Pci;

/// <summary>
/// One MSI-X vector bound to its own interrupt route (the VMM: a KVM GSI route plus an irqfd,
/// CH vmm/src/interrupt.rs). <see cref="MsixTable"/> programs it when the guest unmasks the
/// entry or changes an unmasked entry's message, and raises it with <see cref="Trigger"/>.
/// </summary>
public interface IMsiVector
{
    /// <summary>
    /// Binds the vector to the message (address, data). Called on the vCPU thread that wrote the
    /// table or the capability, under the table's lock, only when the message changed; may take a
    /// VM-wide ioctl (KVM_SET_GSI_ROUTING), must not throw (a refused route falls back to slow delivery).
    /// </summary>
    void Program(ulong address, uint data);

    /// <summary>Sends the programmed message: lock-free, allocation-free, from any thread.</summary>
    void Trigger();
}
