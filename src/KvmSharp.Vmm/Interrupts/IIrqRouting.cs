using KvmSharp.Kvm.Native;

namespace KvmSharp.Vmm.Interrupts;

/// <summary>
/// The KVM interrupt ioctls the interrupt objects use: a seam so they can be tested without
/// /dev/kvm. <see cref="KvmIrqRouting"/> forwards each method to the <c>KvmVm</c> method of the same ioctl.
/// </summary>
internal interface IIrqRouting
{
    /// <summary>KVM_SET_GSI_ROUTING (replaces the whole table).</summary>
    /// <exception cref="Interop.NativeException">The host refused it.</exception>
    void SetGsiRouting(ReadOnlySpan<kvm_irq_routing_entry> entries);

    /// <summary>KVM_IRQFD: the eventfd injects an edge on the GSI.</summary>
    /// <exception cref="Interop.NativeException">The host refused it.</exception>
    void RegisterIrqfd(int eventFd, uint gsi);

    /// <summary>KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE: the eventfd asserts a level, EOI deasserts and signals the resample fd.</summary>
    /// <exception cref="Interop.NativeException">The host refused it.</exception>
    void RegisterIrqfdWithResample(int eventFd, uint gsi, int resampleFd);

    /// <summary>KVM_IRQFD with KVM_IRQFD_FLAG_DEASSIGN.</summary>
    /// <exception cref="Interop.NativeException">The host refused it.</exception>
    void UnregisterIrqfd(int eventFd, uint gsi);

    /// <summary>KVM_IRQ_LINE.</summary>
    /// <exception cref="Interop.NativeException">The host refused it.</exception>
    void SetIrqLine(uint gsi, bool level);

    /// <summary>KVM_SIGNAL_MSI; never throws.</summary>
    bool SignalMsi(ulong address, uint data);
}
