using System.Buffers.Binary;
using KvmSharp.Devices.Pci;
using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

/// <summary>
/// A device signals interrupts from its worker while holding its own lock, and a vCPU notifies
/// it through the transport: the two paths must not take the same two locks in opposite orders.
/// </summary>
public sealed class TransportLockOrderTests : IDisposable
{
    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);

    public void Dispose() => _memory.Dispose();

    [Fact]
    public void PciNotifyFromVcpu_AndSignalFromWorker_DoNotDeadlock()
    {
        var rng = new VirtioRng(16);
        var mmio = new Bus();
        var root = new PciRoot(mmio, new Bus());
        var msi = new RecordingMsiSink();
        var pci = TestTransports.Pci(rng, _memory, msi, new RecordingLevelLine(), 0xE000_0000, 0xE000_4000);
        int slot = root.AddDevice(pci);
        root.ConfigWrite(0, slot, 0, PciConfigSpace.COMMAND, [0x06, 0x00]);
        var driver = new MockDriver(_memory, 16);

        void W(ulong offset, int width, ulong value)
        {
            Span<byte> b = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(b, value);
            Assert.True(mmio.TryWrite(0xE000_0000 + offset, b[..width]));
        }
        W(0x14, 1, 1); W(0x14, 1, 3);
        W(0x08, 4, 1); W(0x0C, 4, 1); // VERSION_1
        W(0x14, 1, 11);
        W(0x16, 2, 0); W(0x18, 2, 16);
        W(0x20, 8, MockDriver.DescAddr); W(0x28, 8, MockDriver.AvailAddr); W(0x30, 8, MockDriver.UsedAddr);
        W(0x1C, 2, 1);
        W(0x14, 1, 15);
        Assert.Equal(VirtioDeviceStatus.DRIVER_OK, pci.DeviceStatus & VirtioDeviceStatus.DRIVER_OK);

        bool stop = false;
        var worker = new Thread(() =>
        {
            while (!Volatile.Read(ref stop))
                rng.ProcessQueue(); // I/O-thread path: device lock, then Signal
        });
        var vcpu = new Thread(() =>
        {
            Span<byte> b = stackalloc byte[2];
            for (int i = 0; i < 20_000; i++)
            {
                driver.AddChain((MockDriver.DataAddr, 8, true));
                mmio.TryWrite(0xE000_0000 + VirtioPciTransport.NotifyOffset, b); // transport, then device
            }
        });
        worker.IsBackground = true; // a regression must fail the test, not hang the run
        vcpu.IsBackground = true;
        worker.Start();
        vcpu.Start();
        bool finished = vcpu.Join(TimeSpan.FromSeconds(30));
        Volatile.Write(ref stop, true);
        Assert.True(finished, "deadlock between the notify path and the interrupt path");
        Assert.True(worker.Join(TimeSpan.FromSeconds(10)));
    }
}
