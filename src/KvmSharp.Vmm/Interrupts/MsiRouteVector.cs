using KvmSharp.Devices.Pci;
using KvmSharp.Interop;

namespace KvmSharp.Vmm.Interrupts;

/// <summary>
/// One MSI-X vector of <see cref="KvmMsiRoutes"/>: a fixed GSI whose route the guest's message
/// selects, and the irqfd bound to it. <see cref="Trigger"/> is one eventfd write.
/// </summary>
internal sealed class MsiRouteVector : IMsiVector, IDisposable
{
    private readonly KvmMsiRoutes _routes;
    // Set by Program (the MSI-X table's lock serialises it), read by Trigger on any thread.
    private volatile FileDescriptor? _fd;
    // The message for the KVM_SIGNAL_MSI fallback, replaced whole so a reader sees one message.
    private volatile Message? _message;

    public MsiRouteVector(KvmMsiRoutes routes, uint gsi)
    {
        _routes = routes;
        Gsi = gsi;
    }

    public uint Gsi { get; }

    /// <summary>The irqfd's eventfd once programmed (tests).</summary>
    internal int? EventFd => _fd?.Fd;

    public void Program(ulong address, uint data)
    {
        _message = new Message(address, data); // rare (unmask/reprogram): one small object
        // On a refusal the routes fall back for good; the eventfd stays open until Dispose, so a
        // trigger racing with this never writes to a closed (or reused) descriptor.
        if (_routes.Program(Gsi, _fd, address, data) is { } fd)
            _fd = fd;
    }

    public void Trigger()
    {
        if (!_routes.UsesSignalMsi && _fd is { } fd)
        {
            Libc.EventFdWrite(fd.Fd);
            return;
        }
        if (_message is { } m)
            _routes.Deliver(m.Address, m.Data);
    }

    public void Dispose() => _fd?.Dispose();

    private sealed record Message(ulong Address, uint Data);
}
