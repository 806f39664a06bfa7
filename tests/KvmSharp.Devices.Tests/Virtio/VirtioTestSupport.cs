using KvmSharp.Devices.Pci;
using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

/// <summary>An <see cref="IVirtioInterrupt"/> that counts signals per kind.</summary>
internal sealed class CountingInterrupt : IVirtioInterrupt
{
    private int _queue;
    private int _config;

    public int QueueSignals => Volatile.Read(ref _queue);

    public int ConfigSignals => Volatile.Read(ref _config);

    public int LastQueue { get; private set; } = -1;

    public void Signal(VirtioInterruptType type, int queueIndex)
    {
        if (type == VirtioInterruptType.Config)
        {
            Interlocked.Increment(ref _config);
        }
        else
        {
            LastQueue = queueIndex;
            Interlocked.Increment(ref _queue);
        }
    }
}

/// <summary>
/// The driver side of several split virtqueues in one guest memory (virtio-queue mock.rs): queue
/// <c>q</c> has its rings at <see cref="Base"/> + q * <see cref="Stride"/>.
/// </summary>
internal sealed class MultiQueueDriver
{
    public const ulong Base = 0x20000, Stride = 0x4000;
    public const ushort F_NEXT = 1, F_WRITE = 2;

    private readonly GuestMemory _memory;
    private readonly ushort[] _availIdx;
    private readonly ushort[] _nextDesc;

    public MultiQueueDriver(GuestMemory memory, int count, ushort size)
    {
        _memory = memory;
        Size = size;
        Queues = new VirtQueue[count];
        _availIdx = new ushort[count];
        _nextDesc = new ushort[count];
        for (int q = 0; q < count; q++)
        {
            Queues[q] = new VirtQueue(size)
            {
                DescriptorTable = new GuestAddress(Desc(q)),
                AvailableRing = new GuestAddress(Avail(q)),
                UsedRing = new GuestAddress(UsedAddr(q)),
                Ready = true,
            };
            Assert.True(Queues[q].IsValid(memory));
        }
    }

    public ushort Size { get; }

    public VirtQueue[] Queues { get; }

    private static ulong Desc(int q) => Base + (ulong)q * Stride;

    private static ulong Avail(int q) => Desc(q) + 0x1000;

    private static ulong UsedAddr(int q) => Desc(q) + 0x2000;

    public ushort AddChain(int q, params (ulong Addr, uint Len, bool Write)[] buffers)
    {
        ushort head = _nextDesc[q];
        for (int i = 0; i < buffers.Length; i++)
        {
            ushort index = (ushort)((_nextDesc[q] + i) % Size);
            bool last = i == buffers.Length - 1;
            ulong a = Desc(q) + 16UL * index;
            _memory.Write(new GuestAddress(a), buffers[i].Addr);
            _memory.Write(new GuestAddress(a + 8), buffers[i].Len);
            _memory.Write(new GuestAddress(a + 12), (ushort)((buffers[i].Write ? F_WRITE : 0) | (last ? 0 : F_NEXT)));
            _memory.Write(new GuestAddress(a + 14), (ushort)((index + 1) % Size));
        }
        _nextDesc[q] = (ushort)((_nextDesc[q] + buffers.Length) % Size);
        _memory.Write(new GuestAddress(Avail(q) + 4 + 2UL * (ushort)(_availIdx[q] % Size)), head);
        _availIdx[q]++;
        _memory.Write(new GuestAddress(Avail(q) + 2), _availIdx[q]);
        return head;
    }

    public ushort UsedIdx(int q) => _memory.Read<ushort>(new GuestAddress(UsedAddr(q) + 2));

    public (uint Id, uint Len) Used(int q, ushort i)
    {
        ulong a = UsedAddr(q) + 4 + 8UL * (ushort)(i % Size);
        return (_memory.Read<uint>(new GuestAddress(a)), _memory.Read<uint>(new GuestAddress(a + 4)));
    }
}

/// <summary>
/// The VMM's queue events, run inline: a notify write is served on the writing thread, as if
/// the I/O thread read the queue's eventfd at once. Counts the kicks.
/// </summary>
internal sealed class InlineQueueNotifier : IVirtioQueueNotifier
{
    private int _kicks;

    public IVirtioTransport? Transport { get; set; }

    public int Kicks => Volatile.Read(ref _kicks);

    /// <summary>Runs after each kick: waits for a device's own worker (virtio-blk).</summary>
    public Action? Then { get; set; }

    public void Notify(int queueIndex)
    {
        Interlocked.Increment(ref _kicks);
        Transport?.NotifyQueue(queueIndex);
        Then?.Invoke();
    }
}

/// <summary>Transports wired to an <see cref="InlineQueueNotifier"/>.</summary>
internal static class TestTransports
{
    public static VirtioMmioTransport Mmio(IVirtioDevice device, GuestMemory memory, IInterruptLine irq)
    {
        var notifier = new InlineQueueNotifier { Then = device is VirtioBlock blk ? blk.WaitIdle : null };
        var transport = new VirtioMmioTransport(device, memory, irq, notifier);
        notifier.Transport = transport;
        return transport;
    }

    public static VirtioPciTransport Pci(IVirtioDevice device, GuestMemory memory, IMsiSink msi, ILevelInterruptLine intx,
        ulong bar0Address, ulong bar2Address)
    {
        var notifier = new InlineQueueNotifier { Then = device is VirtioBlock blk ? blk.WaitIdle : null };
        var transport = new VirtioPciTransport(device, memory, msi, intx, notifier, bar0Address, bar2Address);
        notifier.Transport = transport;
        return transport;
    }
}
