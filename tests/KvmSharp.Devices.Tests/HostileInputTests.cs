using KvmSharp.Devices.Pci;
using KvmSharp.Devices.Tests.Virtio;
using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests;

/// <summary>
/// Guests control every register access (style.md §4, §7): random offsets, widths and values,
/// fixed seeds. No device may throw, and each keeps its basic invariants.
/// </summary>
public sealed class HostileInputTests : IDisposable
{
    private static readonly int[] Widths = [1, 1, 1, 2, 4, 8];
    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);

    public void Dispose() => _memory.Dispose();

    private static void Hammer(IBusDevice device, ulong length, int seed, int accesses, Action? check = null)
    {
        var random = new Random(seed);
        Span<byte> buffer = stackalloc byte[8];
        for (int i = 0; i < accesses; i++)
        {
            int width = Widths[random.Next(Widths.Length)];
            if ((ulong)width > length)
                width = 1;
            ulong offset = (ulong)random.NextInt64(0, (long)(length - (ulong)width + 1));
            Span<byte> data = buffer[..width];
            if (random.Next(2) == 0)
            {
                device.Read(offset, data);
            }
            else
            {
                random.NextBytes(data);
                device.Write(offset, data);
            }
            check?.Invoke();
        }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void Serial8250_SurvivesRandomAccesses(int seed)
    {
        var irq = new CountingLine();
        var serial = new Serial8250(irq, Stream.Null);
        var random = new Random(seed + 100);
        var one = new byte[1];
        Hammer(serial, 8, seed, 20_000, () =>
        {
            if (random.Next(50) == 0)
                serial.EnqueueInput([(byte)random.Next(256)]);
            serial.Write(3, [0x03]); // DLAB off so the next two reads see IIR and LSR
            serial.Read(2, one);
            Assert.Contains(one[0] & 0x0F, new[] { 0x01, 0x06, 0x04, 0x0C, 0x02, 0x00 });
            Assert.Equal(0, one[0] & 0x30);
            serial.Read(5, one);
            Assert.Equal(0x60, one[0] & 0x60); // THRE and TEMT: the transmitter never fills
        });
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public void LegacyDevices_SurviveRandomAccesses(int seed)
    {
        int resets = 0;
        Hammer(new I8042(() => resets++), 5, seed, 20_000);
        Hammer(new PortB(), 1, seed, 1000);
        Hammer(new CmosRtc(() => new DateTime(2026, 11, 26, 5, 0, 0, DateTimeKind.Utc), 3UL << 30, 1UL << 30), 2, seed, 50_000);
        Hammer(new CmosRtc(() => DateTime.UtcNow, 1UL << 20, 0), 2, seed + 7, 50_000);
        Hammer(new DebugExit(_ => { }), 1, seed, 100);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public void PciConfigSpace_SurvivesRandomWrites_AndBusStaysConsistent(int seed)
    {
        var mmio = new Bus();
        var pio = new Bus();
        var root = new PciRoot(mmio, pio);
        var device = TestTransports.Pci(new FakeVirtioDevice(), _memory, new RecordingMsiSink(), new RecordingLevelLine(),
            0xE000_0000, 0xE000_4000);
        int slot = root.AddDevice(device);
        var random = new Random(seed);
        Span<byte> data = stackalloc byte[4];
        for (int i = 0; i < 20_000; i++)
        {
            int width = random.Next(3) switch { 0 => 1, 1 => 2, _ => 4 };
            int offset = random.Next(0, 0x100 / width) * width;
            if (random.Next(2) == 0)
            {
                root.ConfigRead(0, random.Next(4) == 0 ? random.Next(32) : slot, 0, offset, data[..width]);
            }
            else
            {
                random.NextBytes(data[..width]);
                root.ConfigWrite(0, slot, 0, offset, data[..width]);
            }
            // Whatever the guest did, every BAR is mapped at most once and only where it says.
            Assert.True(mmio.Count <= 2);
        }
        Hammer(device.Msix, MsixTable.RegionSize, seed, 10_000);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public void VirtioTransports_SurviveRandomRegisterAccesses(int seed)
    {
        var mmio = TestTransports.Mmio(new VirtioRng(16), _memory, new CountingLine());
        Hammer(mmio, VirtioMmioTransport.RegionSize, seed, 50_000);

        var mmioBus = new Bus();
        var root = new PciRoot(mmioBus, new Bus());
        var pci = TestTransports.Pci(new VirtioRng(16), _memory, new RecordingMsiSink(), new RecordingLevelLine(),
            0xE000_0000, 0xE000_4000);
        root.AddDevice(pci);
        pci.Config.SetUInt16(PciConfigSpace.COMMAND, PciConfigSpace.COMMAND_MEMORY);
        root.ConfigWrite(0, 1, 0, PciConfigSpace.COMMAND, [0x02, 0x00]); // map the BARs
        var random = new Random(seed);
        Span<byte> buffer = stackalloc byte[8];
        for (int i = 0; i < 50_000; i++)
        {
            int width = Widths[random.Next(Widths.Length)];
            ulong offset = (ulong)random.NextInt64(0, (long)VirtioPciTransport.Bar0Size - 8);
            // Bias toward the common configuration block, where the state machine lives.
            if (random.Next(2) == 0)
                offset &= 0x3F;
            Span<byte> data = buffer[..width];
            if (random.Next(2) == 0)
            {
                mmioBus.TryRead(0xE000_0000 + offset, data);
            }
            else
            {
                random.NextBytes(data);
                mmioBus.TryWrite(0xE000_0000 + offset, data);
            }
        }
    }
}
