using KvmSharp.Devices;
using KvmSharp.Interop;

namespace KvmSharp.Vmm.Interrupts;

/// <summary>
/// A level-triggered line (PCI INTx) as an irqfd with a resample fd (api.rst §4.75 KVM_IRQFD,
/// KVM_IRQFD_FLAG_RESAMPLE): asserting is one eventfd write from whichever thread raised it; KVM
/// deasserts the GSI when the guest EOIs it and signals the resample fd, and the I/O thread
/// re-asserts if the device's level is still high. Deasserting therefore takes effect at the
/// guest's next EOI, which is when a level-triggered source is looked at again (the guest handler
/// reads the device's ISR, which is what deasserts it, before the EOI).
/// </summary>
internal sealed class ResampledLevelLine : ILevelInterruptLine, IEventHandler, IDisposable
{
    private readonly FileDescriptor _irqFd;
    private readonly FileDescriptor _resampleFd;
    private volatile bool _level;

    public ResampledLevelLine(FileDescriptor irqFd, FileDescriptor resampleFd, uint gsi)
    {
        _irqFd = irqFd;
        _resampleFd = resampleFd;
        Gsi = gsi;
    }

    public uint Gsi { get; }
    public int IrqFd => _irqFd.Fd;
    public int ResampleFd => _resampleFd.Fd;

    public void SetLevel(bool asserted)
    {
        _level = asserted;
        if (asserted)
            Libc.EventFdWrite(_irqFd.Fd);
    }

    /// <summary>The guest EOId the GSI (the I/O thread: the resample fd is readable).</summary>
    public EventResult Process(uint events)
    {
        Libc.EventFdRead(_resampleFd.Fd);
        if (_level)
            Libc.EventFdWrite(_irqFd.Fd);
        return EventResult.Done;
    }

    public void Dispose()
    {
        _irqFd.Dispose();
        _resampleFd.Dispose();
    }
}
