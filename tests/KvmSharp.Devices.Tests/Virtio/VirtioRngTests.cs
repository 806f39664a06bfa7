using System.Buffers.Binary;
using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

/// <summary>virtio-rng behind virtio-mmio, driven by a mock driver through guest memory.</summary>
public sealed class VirtioRngTests : IDisposable
{
    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);
    private readonly StringWriter _log = new();
    private readonly VirtioRng _rng;
    private readonly CountingLine _irq = new();
    private readonly VirtioMmioTransport _mmio;
    private readonly MockDriver _driver;

    public VirtioRngTests()
    {
        _rng = new VirtioRng(16, new RateLimitedLog(_log, burst: 10, TimeSpan.FromMinutes(1)));
        _mmio = TestTransports.Mmio(_rng, _memory, _irq);
        _driver = new MockDriver(_memory, 16); // ring layout and descriptor writer
    }

    public void Dispose() => _memory.Dispose();

    private void W(ulong offset, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _mmio.Write(offset, b);
    }

    private uint R(ulong offset)
    {
        Span<byte> b = stackalloc byte[4];
        _mmio.Read(offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private void Start(bool eventIdx)
    {
        W(0x70, 0); W(0x70, 1); W(0x70, 3);
        W(0x14, 0);
        uint low = R(0x10);
        Assert.Equal(0u, low & 0xFFFF); // no device-specific features
        W(0x24, 0); W(0x20, eventIdx ? 1u << 29 : 0);
        W(0x24, 1); W(0x20, 1); // VERSION_1
        W(0x70, 11);
        W(0x30, 0);
        Assert.Equal(16u, R(0x34));
        W(0x38, 16);
        W(0x80, (uint)MockDriver.DescAddr); W(0x84, 0);
        W(0x90, (uint)MockDriver.AvailAddr); W(0x94, 0);
        W(0xa0, (uint)MockDriver.UsedAddr); W(0xa4, 0);
        W(0x44, 1);
        W(0x70, 15);
        Assert.Equal(15u, R(0x70));
    }

    [Fact]
    public void Request_IsFilledWithRandomBytes_AndInterrupts()
    {
        Start(eventIdx: false);
        ushort head = _driver.AddChain((MockDriver.DataAddr, 64, true));
        W(0x50, 0); // QueueNotify
        Assert.Equal(1, _driver.UsedIdx);
        Assert.Equal(((uint)head, 64u), _driver.Used(0));
        var data = new byte[64];
        _memory.Read(new GuestAddress(MockDriver.DataAddr), data);
        Assert.Contains(data, b => b != 0);
        Assert.Equal(1, _irq.Count);
        Assert.Equal(1u, R(0x60));
        Assert.Equal(64, _rng.BytesServed);
    }

    [Fact]
    public void EventIdx_KeepsAvailEventCurrent_AndHonoursUsedEvent()
    {
        Start(eventIdx: true);
        _driver.AddChain((MockDriver.DataAddr, 8, true));
        _driver.AddChain((MockDriver.DataAddr + 0x100, 8, true));
        _rng.ProcessQueue(); // the ioeventfd path
        Assert.Equal(2, _driver.UsedIdx);
        Assert.Equal(2, _driver.AvailEvent); // driver kicks again once avail.idx passes 2
        Assert.Equal(1, _irq.Count);

        _driver.SetUsedEvent(5); // driver: "interrupt me after entry 5"
        _driver.AddChain((MockDriver.DataAddr, 8, true));
        _rng.ProcessQueue();
        Assert.Equal(1, _irq.Count);
        for (int i = 0; i < 3; i++)
            _driver.AddChain((MockDriver.DataAddr, 8, true));
        _rng.ProcessQueue(); // used.idx goes 3 -> 6, passing 5
        Assert.Equal(2, _irq.Count);
        Assert.Equal(6, _driver.AvailEvent);
    }

    [Fact]
    public void LargeRequest_IsCappedPerChain()
    {
        Start(eventIdx: false);
        _driver.AddChain((MockDriver.DataAddr, 0x20000, true));
        W(0x50, 0);
        Assert.Equal((uint)VirtioRng.MaxBytesPerRequest, _driver.Used(0).Len);
    }

    [Fact]
    public void MalformedChain_ReturnedEmpty_AndBrokenRingStopsTheDevice()
    {
        Start(eventIdx: false);
        _driver.WriteDesc(MockDriver.DescAddr, 3, MockDriver.DataAddr, 8, (ushort)(MockDriver.F_WRITE | MockDriver.F_NEXT), 3); // self-loop
        _driver.Publish(3);
        W(0x50, 0);
        Assert.Equal((3u, 0u), _driver.Used(0));
        Assert.Equal(1, _rng.BadChains);
        Assert.Contains("virtio-rng: malformed descriptor chain (head 3)", _log.ToString(), StringComparison.Ordinal);

        _driver.SetAvailIdx(100); // impossible
        W(0x50, 0);
        Assert.True(_rng.Broken);
        Assert.Contains("virtio-rng: impossible ring state on queue 0", _log.ToString(), StringComparison.Ordinal);
        W(0x70, 0); // reset clears it
        Assert.False(_rng.Broken);
    }

    [Fact]
    public void NotifyBeforeActivation_IsIgnored()
    {
        _rng.ProcessQueue();
        W(0x50, 0);
        Assert.Equal(0, _driver.UsedIdx);
    }
}
