using KvmSharp.Devices.Virtio;
using KvmSharp.Interop;
using KvmSharp.Kvm;

namespace KvmSharp.Vmm.Virtio;

/// <summary>
/// One eventfd per virtqueue of a transport: the only way into its device (as Firecracker's and
/// Cloud Hypervisor's queue events). KVM signals it through an ioeventfd on the queue's notify
/// address, so a kick costs no exit; a notify write KVM did not catch reaches the transport, which
/// signals the same eventfd through <see cref="IVirtioQueueNotifier"/>. Either way the I/O thread
/// reads it and serves the queue: no device work runs on a vCPU thread.
/// </summary>
/// <remarks>If KVM refuses an ioeventfd, kicks arrive as exits and go the notifier way; only
/// speed is lost.</remarks>
internal sealed class VirtioQueueEvents : IVirtioQueueNotifier, IDisposable
{
    private readonly KvmVm _vm;
    private readonly EventLoop _loop;
    private readonly TextWriter _log;
    private readonly FileDescriptor[] _fds;

    // Where each queue's ioeventfd sits (null: none); changed when a BAR moves (vCPU threads).
    private readonly Lock _lock = new();
    private readonly ulong?[] _assigned;
    private uint _width;
    private bool _matchQueueIndex;

    public VirtioQueueEvents(KvmVm vm, EventLoop loop, int queueCount, TextWriter log)
    {
        _vm = vm;
        _loop = loop;
        _log = log;
        _fds = new FileDescriptor[queueCount];
        _assigned = new ulong?[queueCount];
        for (int q = 0; q < queueCount; q++)
            _fds[q] = Libc.EventFd();
    }

    /// <inheritdoc/>
    public void Notify(int queueIndex) => Libc.EventFdWrite(_fds[queueIndex].Fd);

    /// <summary>Puts one handler per queue of <paramref name="transport"/> on the event loop.</summary>
    public void Attach(IVirtioTransport transport)
    {
        for (int q = 0; q < _fds.Length; q++)
            _loop.Add(_fds[q].Fd, Libc.EPOLLIN, new QueueHandler(transport, q, _fds[q].Fd));
    }

    /// <summary>
    /// Registers queue <i>q</i>'s eventfd as an ioeventfd at <paramref name="notifyBase"/> +
    /// q·<paramref name="stride"/>, <paramref name="width"/> bytes wide, matching the written
    /// value against q when <paramref name="matchQueueIndex"/> (virtio-mmio's single QueueNotify
    /// register, virtio 1.2 §4.2.2) or any value (virtio-pci's per-queue address, §4.1.4.4).
    /// </summary>
    public void AssignIoeventfds(ulong notifyBase, ulong stride, uint width, bool matchQueueIndex)
    {
        lock (_lock)
        {
            DeassignLocked();
            _width = width;
            _matchQueueIndex = matchQueueIndex;
            for (int q = 0; q < _fds.Length; q++)
            {
                ulong address = notifyBase + (ulong)q * stride;
                try
                {
                    _vm.RegisterIoeventfd(_fds[q].Fd, address, width, pio: false, dataMatch: matchQueueIndex ? (ulong)q : null);
                    _assigned[q] = address;
                }
                catch (KvmException e)
                {
                    _log.WriteLine($"kvmsharp: no ioeventfd for virtqueue {q} at 0x{address:x} ({e.Message}); its kicks will exit to the VMM");
                }
            }
        }
    }

    /// <summary>Removes the ioeventfds (the BAR moved away or the device goes).</summary>
    public void DeassignIoeventfds()
    {
        lock (_lock)
            DeassignLocked();
    }

    private void DeassignLocked()
    {
        for (int q = 0; q < _fds.Length; q++)
        {
            if (_assigned[q] is not { } address)
                continue;
            _assigned[q] = null;
            try
            {
                _vm.RegisterIoeventfd(_fds[q].Fd, address, _width, pio: false, dataMatch: _matchQueueIndex ? (ulong)q : null, deassign: true);
            }
            catch (KvmException)
            {
                // Already gone with the VM; nothing else to undo.
            }
        }
    }

    public void Dispose()
    {
        DeassignIoeventfds();
        foreach (FileDescriptor fd in _fds)
        {
            _loop.Remove(fd.Fd);
            fd.Dispose();
        }
    }

    /// <summary>One queue's handler on the I/O thread: no look-up between the event and the transport.</summary>
    private sealed class QueueHandler(IVirtioTransport transport, int queueIndex, int fd) : IEventHandler
    {
        public EventResult Process(uint events)
        {
            if (events != 0)
                Libc.EventFdRead(fd);
            return transport.NotifyQueue(queueIndex) ? EventResult.MoreWork : EventResult.Done;
        }
    }
}
