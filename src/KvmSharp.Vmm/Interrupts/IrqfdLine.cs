using KvmSharp.Devices;
using KvmSharp.Interop;

namespace KvmSharp.Vmm.Interrupts;

/// <summary>An interrupt line backed by a KVM irqfd: a write to the eventfd injects an edge on the GSI.</summary>
internal sealed class IrqfdLine : IInterruptLine, IDisposable
{
    private readonly FileDescriptor _eventFd;

    public IrqfdLine(FileDescriptor eventFd, uint gsi)
    {
        _eventFd = eventFd;
        Gsi = gsi;
    }

    public uint Gsi { get; }
    public int Fd => _eventFd.Fd;

    public void Trigger() => Libc.EventFdWrite(_eventFd.Fd);

    public void Dispose() => _eventFd.Dispose();
}
