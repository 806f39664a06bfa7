using KvmSharp.Devices.Pci;
using KvmSharp.Devices.Virtio;
using KvmSharp.Interop;
using KvmSharp.Kvm;

namespace KvmSharp.Vmm.Pci;

/// <summary>
/// Keeps one ioeventfd per virtqueue on each virtio-pci device's notify region, following the BAR
/// wherever the guest maps it, so a queue kick is an eventfd signal to the I/O thread instead of an
/// exit to user space (design.md: "notifications arrive through ioeventfd"). If KVM refuses the
/// ioeventfd, kicks still arrive as MMIO exits through the bus; only speed is lost.
/// </summary>
internal sealed class VirtioNotifier : IPciBarObserver, IEventHandler, IDisposable
{
    private readonly KvmVm _vm;
    private readonly EventLoop _loop;
    private readonly TextWriter _log;
    private readonly Lock _lock = new();
    private readonly Dictionary<int, (VirtioPciTransport Transport, int Queue, ulong Address, FileDescriptor Fd)> _byFd = [];

    public VirtioNotifier(KvmVm vm, EventLoop loop, TextWriter log)
    {
        _vm = vm;
        _loop = loop;
        _log = log;
    }

    public void BarMapped(IPciDevice device, PciBar bar, ulong address)
    {
        if (device is not VirtioPciTransport transport || bar.Index != 0)
            return;
        lock (_lock)
        {
            for (int q = 0; q < transport.Queues.Count; q++)
            {
                ulong notify = address + VirtioPciTransport.NotifyOffset + (ulong)q * VirtioPciTransport.NotifyOffMultiplier;
                var fd = Libc.EventFd();
                try
                {
                    // Linux's virtio-pci driver writes the queue index as 16 bits (virtio 1.2 §4.1.5.2).
                    _vm.RegisterIoeventfd(fd.Fd, notify, 2, pio: false);
                }
                catch (KvmException e)
                {
                    _log.WriteLine($"kvmsharp: no ioeventfd for a virtqueue at 0x{notify:x} ({e.Message}); kicks will exit to the VMM");
                    fd.Dispose();
                    continue;
                }
                _byFd[fd.Fd] = (transport, q, notify, fd);
                _loop.Add(fd.Fd, Libc.EPOLLIN, this);
            }
        }
    }

    public void BarUnmapped(IPciDevice device, PciBar bar, ulong address)
    {
        if (device is not VirtioPciTransport transport || bar.Index != 0)
            return;
        lock (_lock)
        {
            foreach (var (fd, entry) in _byFd.Where(e => e.Value.Transport == transport).ToList())
                Release(fd, entry.Address, entry.Fd);
        }
    }

    private void Release(int fd, ulong address, FileDescriptor handle)
    {
        _loop.Remove(fd);
        try
        {
            _vm.RegisterIoeventfd(fd, address, 2, pio: false, deassign: true);
        }
        catch (KvmException)
        {
            // Already gone with the VM; nothing else to undo.
        }
        handle.Dispose();
        _byFd.Remove(fd);
    }

    public void Process(int fd, uint events)
    {
        Libc.EventFdRead(fd);
        VirtioPciTransport? transport;
        int queue;
        lock (_lock)
        {
            if (!_byFd.TryGetValue(fd, out var entry))
                return;
            transport = entry.Transport;
            queue = entry.Queue;
        }
        transport.NotifyQueue(queue);
    }

    public void Dispose()
    {
        lock (_lock)
        {
            foreach (var (fd, entry) in _byFd.ToList())
                Release(fd, entry.Address, entry.Fd);
        }
    }
}
