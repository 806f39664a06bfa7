using KvmSharp.Devices;
using KvmSharp.Devices.Pci;
using KvmSharp.Interop;

namespace KvmSharp.Vmm.Interrupts;

/// <summary>
/// The interrupt objects of one VM on KVM's in-kernel irqchip: edge lines as irqfds, level lines
/// as irqfds with a resample fd served by the I/O thread (KVM_IRQ_LINE if the host refuses), and
/// MSI-X vectors as GSI routes with irqfds (<see cref="KvmMsiRoutes"/>). Owns every eventfd it creates.
/// </summary>
internal sealed class KvmInterruptController : IInterruptController, IDisposable
{
    private readonly IIrqRouting _vm;
    private readonly Func<EventLoop> _eventLoop;
    private readonly TextWriter _log;
    private readonly List<IDisposable> _owned = [];
    private readonly Lock _lock = new();
    private KvmMsiRoutes? _msi;

    /// <param name="vm">The VM's interrupt ioctls.</param>
    /// <param name="eventLoop">The I/O thread, made on first use (resample fds are served there).</param>
    /// <param name="log">Where refused ioctls are reported.</param>
    public KvmInterruptController(IIrqRouting vm, Func<EventLoop> eventLoop, TextWriter log)
    {
        _vm = vm;
        _eventLoop = eventLoop;
        _log = log;
    }

    public IMsiSink Msi
    {
        get
        {
            lock (_lock)
            {
                if (_msi is null)
                {
                    _msi = new KvmMsiRoutes(_vm, _log);
                    _owned.Add(_msi);
                }
                return _msi;
            }
        }
    }

    /// <exception cref="NativeException">The host refused the irqfd.</exception>
    public IInterruptLine CreateEdgeLine(uint gsi)
    {
        var line = new IrqfdLine(Libc.EventFd(), gsi);
        try
        {
            _vm.RegisterIrqfd(line.Fd, gsi);
        }
        catch
        {
            line.Dispose();
            throw;
        }
        lock (_lock)
            _owned.Add(line);
        return line;
    }

    public ILevelInterruptLine CreateLevelLine(uint gsi)
    {
        var irq = Libc.EventFd();
        var resample = Libc.EventFd();
        var line = new ResampledLevelLine(irq, resample, gsi);
        try
        {
            _vm.RegisterIrqfdWithResample(line.IrqFd, gsi, line.ResampleFd);
        }
        catch (NativeException e)
        {
            line.Dispose();
            _log.WriteLine($"kvmsharp: no resampling irqfd for GSI {gsi} ({e.Message}); INTx uses KVM_IRQ_LINE");
            return new KvmLevelLine(_vm, gsi, _log);
        }
        _eventLoop().Add(line.ResampleFd, Libc.EPOLLIN, line);
        lock (_lock)
            _owned.Add(line);
        return line;
    }

    public void Dispose()
    {
        lock (_lock)
        {
            foreach (var o in _owned)
                o.Dispose();
            _owned.Clear();
        }
    }
}
