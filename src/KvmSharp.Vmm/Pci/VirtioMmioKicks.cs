using System.Buffers.Binary;
using KvmSharp.Devices.Virtio;
using KvmSharp.Interop;
using KvmSharp.Kvm;

namespace KvmSharp.Vmm.Pci;

/// <summary>
/// One ioeventfd per virtqueue of a virtio-mmio device, on its QueueNotify register with the queue
/// index as data match (virtio 1.2 §4.2.2: the driver writes the queue index there), so a kick is
/// an eventfd signal to the I/O thread instead of an exit. When it fires, the transport sees the
/// same write the guest made. If KVM refuses, kicks arrive as MMIO exits; only speed is lost.
/// </summary>
internal sealed class VirtioMmioKicks : IEventHandler, IDisposable
{
    private readonly VirtioMmioTransport _transport;
    private readonly Dictionary<int, (uint Queue, FileDescriptor Fd)> _byFd = [];

    public VirtioMmioKicks(KvmVm vm, EventLoop loop, VirtioMmioTransport transport, ulong baseAddress, TextWriter log)
    {
        _transport = transport;
        ulong notify = baseAddress + VirtioMmioTransport.QueueNotifyOffset;
        for (uint q = 0; q < (uint)transport.Queues.Count; q++)
        {
            var fd = Libc.EventFd();
            try
            {
                vm.RegisterIoeventfd(fd.Fd, notify, 4, pio: false, dataMatch: q);
            }
            catch (KvmException e)
            {
                log.WriteLine($"kvmsharp: no ioeventfd for virtio-mmio queue {q} at 0x{notify:x} ({e.Message}); kicks will exit to the VMM");
                fd.Dispose();
                continue;
            }
            _byFd[fd.Fd] = (q, fd);
            loop.Add(fd.Fd, Libc.EPOLLIN, this);
        }
    }

    public void Process(int fd, uint events)
    {
        Libc.EventFdRead(fd);
        if (!_byFd.TryGetValue(fd, out var entry))
            return;
        Span<byte> value = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(value, entry.Queue);
        _transport.Write(VirtioMmioTransport.QueueNotifyOffset, value);
    }

    public void Dispose()
    {
        foreach (var (_, fd) in _byFd.Values)
            fd.Dispose();
        _byFd.Clear();
    }
}
