using System.Buffers.Binary;
using KvmSharp.Devices.Pci;
using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

/// <summary>
/// A notify-register write that reaches a transport (no ioeventfd) goes to the VMM's queue event,
/// never into the device on the writing (vCPU) thread; the I/O thread then calls NotifyQueue.
/// </summary>
public sealed class QueueKickTests : IDisposable
{
    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);
    private readonly RecordingNotifier _notifier = new();
    private readonly FakeVirtioDevice _device = new();

    public void Dispose() => _memory.Dispose();

    private sealed class RecordingNotifier : IVirtioQueueNotifier
    {
        public List<int> Kicks { get; } = [];

        public void Notify(int queueIndex) => Kicks.Add(queueIndex);
    }

    private static void W32(VirtioMmioTransport device, ulong offset, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        device.Write(offset, b);
    }

    [Fact]
    public void Mmio_QueueNotifyWrite_SignalsTheQueueEvent_NotTheDevice()
    {
        var mmio = new VirtioMmioTransport(_device, _memory, new CountingLine(), _notifier);
        W32(mmio, VirtioMmioTransport.QueueNotifyOffset, 1);
        W32(mmio, VirtioMmioTransport.QueueNotifyOffset, 2); // no such queue: dropped
        W32(mmio, VirtioMmioTransport.QueueNotifyOffset, uint.MaxValue);
        Assert.Equal([1], _notifier.Kicks);
        Assert.Empty(_device.Notified);

        // The I/O thread's call reaches the device only once it runs (DRIVER_OK).
        Assert.False(mmio.NotifyQueue(1));
        Assert.Empty(_device.Notified);
    }

    [Fact]
    public void Pci_NotifyRegionWrite_SignalsTheQueueEvent_NotTheDevice()
    {
        var bus = new Bus();
        var root = new PciRoot(bus, new Bus());
        var pci = new VirtioPciTransport(_device, _memory, new RecordingMsiSink(), new RecordingLevelLine(), _notifier, 0xE000_0000, 0xE000_4000);
        int slot = root.AddDevice(pci);
        root.ConfigWrite(0, slot, 0, PciConfigSpace.COMMAND, [0x02, 0x00]); // memory decoding on
        Span<byte> two = stackalloc byte[2];
        Assert.True(bus.TryWrite(0xE000_0000 + VirtioPciTransport.NotifyOffset + VirtioPciTransport.NotifyOffMultiplier, two));
        Assert.True(bus.TryWrite(0xE000_0000 + VirtioPciTransport.NotifyOffset + 8 * VirtioPciTransport.NotifyOffMultiplier, two));
        Assert.Equal([1], _notifier.Kicks);
        Assert.Empty(_device.Notified);
    }
}
