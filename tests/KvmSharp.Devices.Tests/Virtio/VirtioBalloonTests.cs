using System.Buffers.Binary;
using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

public sealed class VirtioBalloonTests : IDisposable
{
    private const int Inflate = 0, Deflate = 1, StatsQ = 2;
    private const ulong List = 0x40000, StatsBuf = 0x48000;

    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);
    private readonly CountingInterrupt _irq = new();
    private readonly VirtioBalloon _balloon = new(queueSize: 16);
    private readonly MultiQueueDriver _driver;

    public VirtioBalloonTests()
    {
        _driver = new MultiQueueDriver(_memory, 3, 16);
        // Pages 0x80..0xFF carry a pattern: their page number in every byte.
        for (ulong pfn = 0x80; pfn < 0x100; pfn++)
            _memory.Write(new GuestAddress(pfn << 12), Enumerable.Repeat((byte)pfn, 4096).ToArray());
    }

    public void Dispose() => _memory.Dispose();

    private void Activate(ulong features = ~0UL) =>
        Assert.True(_balloon.Activate(_memory, _balloon.DeviceFeatures & features, _driver.Queues, _irq));

    private uint ReadConfig(ulong offset)
    {
        var b = new byte[4];
        _balloon.ReadConfig(offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private bool PageIs(ulong pfn, byte value)
    {
        var b = new byte[4096];
        _memory.Read(new GuestAddress(pfn << 12), b);
        return b.All(x => x == value);
    }

    private ushort Post(int queue, params uint[] pfns)
    {
        for (int i = 0; i < pfns.Length; i++)
            _memory.Write(new GuestAddress(List + 4UL * (ulong)i), pfns[i]);
        return _driver.AddChain(queue, (List, 4u * (uint)pfns.Length, false));
    }

    [Fact]
    public void Features_AndConfig()
    {
        Assert.Equal(VirtioDeviceType.Balloon, _balloon.DeviceType);
        Assert.Equal(3, _balloon.QueueCount);
        Assert.NotEqual(0UL, _balloon.DeviceFeatures & VirtioBalloonFeatures.STATS_VQ);
        Assert.NotEqual(0UL, _balloon.DeviceFeatures & VirtioBalloonFeatures.DEFLATE_ON_OOM);
        Assert.Equal(0UL, _balloon.DeviceFeatures & VirtioBalloonFeatures.MUST_TELL_HOST);
        Assert.Equal(0UL, new VirtioBalloon(deflateOnOom: false).DeviceFeatures & VirtioBalloonFeatures.DEFLATE_ON_OOM);
        Assert.Equal(0u, ReadConfig(0));
        _balloon.WriteConfig(0, [1, 2, 3, 4]); // num_pages is the host's
        Assert.Equal(0u, ReadConfig(0));
        _balloon.WriteConfig(4, [0x34, 0x12, 0, 0]);
        Assert.Equal(0x1234u, ReadConfig(4));
        Assert.Equal(0x1234u, _balloon.ActualPages);
        _balloon.WriteConfig(6, [0x01]); // one byte of actual
        Assert.Equal(0x011234u, _balloon.ActualPages);
        _balloon.WriteConfig(3, [9, 0x78]); // straddles num_pages and actual
        Assert.Equal(0x011278u, _balloon.ActualPages);
        Assert.Equal(0u, ReadConfig(0));
        Assert.Equal(0u, ReadConfig(8));
        Assert.Equal(0u, ReadConfig(64));
    }

    [Fact]
    public void SetTargetPages_UpdatesConfig_AndSignalsAConfigChange()
    {
        _balloon.SetTargetPages(10); // before the driver: no interrupt
        Assert.Equal(0, _irq.ConfigSignals);
        Activate();
        _balloon.SetTargetPages(100);
        Assert.Equal(100u, ReadConfig(0));
        Assert.Equal(100u, _balloon.TargetPages);
        Assert.Equal(1, _irq.ConfigSignals);
        _balloon.SetTargetPages(100); // unchanged: no interrupt
        Assert.Equal(1, _irq.ConfigSignals);
        _balloon.Reset();
        _balloon.SetTargetPages(5);
        Assert.Equal(1, _irq.ConfigSignals);
        Assert.Equal(5u, ReadConfig(0));
    }

    [Fact]
    public void SetTargetPages_ThroughTheMmioTransport_BumpsTheGeneration()
    {
        var line = new CountingLine();
        var mmio = TestTransports.Mmio(_balloon, _memory, line);
        var b = new byte[4];
        mmio.Read(0xfc, b);
        uint before = BinaryPrimitives.ReadUInt32LittleEndian(b);
        Assert.Equal(5u, ReadMmio(mmio, 0x8)); // DeviceID
        // Bring the device up: reset, ACK, DRIVER, features, FEATURES_OK, three queues, DRIVER_OK.
        WriteMmio(mmio, 0x70, 0); WriteMmio(mmio, 0x70, 3);
        WriteMmio(mmio, 0x24, 1); WriteMmio(mmio, 0x20, 1); // VERSION_1
        WriteMmio(mmio, 0x70, 11);
        for (uint q = 0; q < 3; q++)
        {
            ulong baseAddr = MultiQueueDriver.Base + q * MultiQueueDriver.Stride;
            WriteMmio(mmio, 0x30, q); WriteMmio(mmio, 0x38, 16);
            WriteMmio(mmio, 0x80, (uint)baseAddr); WriteMmio(mmio, 0x90, (uint)baseAddr + 0x1000); WriteMmio(mmio, 0xa0, (uint)baseAddr + 0x2000);
            WriteMmio(mmio, 0x44, 1);
        }
        WriteMmio(mmio, 0x70, 15);
        Assert.Equal(15u, ReadMmio(mmio, 0x70));
        _balloon.SetTargetPages(42);
        Assert.Equal(1, line.Count);
        Assert.Equal(2u, ReadMmio(mmio, 0x60)); // interrupt status: configuration change
        Assert.NotEqual(before, ReadMmio(mmio, 0xfc));
        Assert.Equal(42u, ReadMmio(mmio, 0x100));
    }

    private static void WriteMmio(VirtioMmioTransport mmio, ulong offset, uint value)
    {
        var b = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        mmio.Write(offset, b);
    }

    private static uint ReadMmio(VirtioMmioTransport mmio, ulong offset)
    {
        var b = new byte[4];
        mmio.Read(offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    [Fact]
    public void Inflate_DiscardsThePages_AndLeavesOthersAlone()
    {
        Activate();
        ushort head = Post(Inflate, 0x81, 0x82, 0x83, 0x90, 0x85);
        _balloon.QueueNotify(Inflate);
        Assert.Equal((head, 0u), _driver.Used(Inflate, 0));
        Assert.Equal(1, _irq.QueueSignals);
        foreach (ulong pfn in new ulong[] { 0x81, 0x82, 0x83, 0x90, 0x85 })
            Assert.True(PageIs(pfn, 0), $"page {pfn:x} not zero");
        foreach (ulong pfn in new ulong[] { 0x80, 0x84, 0x86, 0x8f, 0x91 })
            Assert.True(PageIs(pfn, (byte)pfn), $"page {pfn:x} changed");
        Assert.Equal(5, _balloon.InflatedPages);
        Assert.Equal(0, _balloon.InvalidPfns);
    }

    [Fact]
    public void Inflate_PfnsOutsideRam_AreIgnoredAndCounted()
    {
        Activate();
        Post(Inflate, 0x100, 0xA0, 0xFFFFFFFF, 0x12345, 0xA1);
        _balloon.QueueNotify(Inflate);
        Assert.Equal(3, _balloon.InvalidPfns);
        Assert.Equal(2, _balloon.InflatedPages);
        Assert.True(PageIs(0xA0, 0));
        Assert.True(PageIs(0xA1, 0));
        Assert.True(PageIs(0xFF, 0xFF));
    }

    [Fact]
    public void Inflate_LargeListAcrossSegments_AndAPartialTrailingPfn()
    {
        Activate();
        // 300 PFNs (more than one internal batch), split over two descriptors at an odd byte.
        for (uint i = 0; i < 300; i++)
            _memory.Write(new GuestAddress(List + 4UL * i), 0x80 + (i % 0x80));
        _driver.AddChain(Inflate, (List, 601, false), (List + 601, 599 + 2, false)); // 1202 bytes: 300 PFNs + 2 stray bytes
        _balloon.QueueNotify(Inflate);
        Assert.Equal(300, _balloon.InflatedPages);
        for (ulong pfn = 0x80; pfn < 0x100; pfn++)
            Assert.True(PageIs(pfn, 0));
    }

    [Fact]
    public void Inflate_AllocatesNothing()
    {
        Activate();
        for (int round = 0; round < 2; round++)
        {
            Post(Inflate, 0x81, 0x82, 0x100, 0x90);
            long before = GC.GetAllocatedBytesForCurrentThread();
            _balloon.QueueNotify(Inflate);
            long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            if (round == 1)
                Assert.Equal(0, allocated);
        }
    }

    [Fact]
    public void Deflate_IsCounted_AndReturned()
    {
        Activate();
        Post(Inflate, 0x88);
        _balloon.QueueNotify(Inflate);
        ushort head = Post(Deflate, 0x88, 0x89);
        _balloon.QueueNotify(Deflate);
        Assert.Equal((head, 0u), _driver.Used(Deflate, 0));
        Assert.Equal(2, _balloon.DeflatedPages);
        Assert.True(PageIs(0x89, 0x89)); // deflate discards nothing
        _memory.Write(new GuestAddress(0x88000), (byte)7); // the guest uses the page again
        Assert.Equal(7, _memory.Read<byte>(new GuestAddress(0x88000)));
    }

    [Fact]
    public void BadChains_AreReturned_AndABrokenRingStopsTheDevice()
    {
        Activate();
        _driver.AddChain(Inflate, (5UL << 20, 8, false));
        _balloon.QueueNotify(Inflate);
        Assert.Equal(1, _balloon.BadChains);
        Assert.Equal(1, _driver.UsedIdx(Inflate));
        _memory.Write(new GuestAddress(MultiQueueDriver.Base + 0x1000 + 2), (ushort)200);
        _balloon.QueueNotify(Inflate);
        Assert.True(_balloon.Broken);
        Assert.False(_balloon.RequestStats());
        _balloon.Reset();
        Assert.False(_balloon.Broken);
        _balloon.QueueNotify(Inflate); // not running: ignored
        _balloon.QueueNotify(9);
    }

    private void WriteStats(params (ushort Tag, ulong Value)[] stats)
    {
        for (int i = 0; i < stats.Length; i++)
        {
            _memory.Write(new GuestAddress(StatsBuf + 10UL * (ulong)i), stats[i].Tag);
            _memory.Write(new GuestAddress(StatsBuf + 10UL * (ulong)i + 2), stats[i].Value);
        }
    }

    [Fact]
    public void Stats_AreParsed_HeldAndRequestedAgain()
    {
        Activate();
        Assert.False(_balloon.RequestStats()); // nothing posted yet
        WriteStats((VirtioBalloonStatTag.MEMFREE, 1000), (VirtioBalloonStatTag.MEMTOT, 4000), (77, 5));
        ushort head = _driver.AddChain(StatsQ, (StatsBuf, 30, false));
        _balloon.QueueNotify(StatsQ);
        Assert.Equal(0, _driver.UsedIdx(StatsQ)); // held by the device
        Assert.Equal(1, _balloon.StatsUpdates);
        Assert.Equal(new VirtioBalloonStat[] { new(4, 1000), new(5, 4000), new(77, 5) }, _balloon.Stats);
        Assert.True(_balloon.TryGetStat(VirtioBalloonStatTag.MEMTOT, out ulong total));
        Assert.Equal(4000UL, total);
        Assert.False(_balloon.TryGetStat(VirtioBalloonStatTag.SWAP_IN, out _));

        int signals = _irq.QueueSignals;
        Assert.True(_balloon.RequestStats());
        Assert.Equal((head, 0u), _driver.Used(StatsQ, 0));
        Assert.Equal(signals + 1, _irq.QueueSignals);
        Assert.Equal(StatsQ, _irq.LastQueue);
        Assert.False(_balloon.RequestStats()); // already outstanding

        // The driver refills and re-posts; a trailing partial entry is ignored.
        WriteStats((VirtioBalloonStatTag.MEMFREE, 900));
        _driver.AddChain(StatsQ, (StatsBuf, 15, false));
        _balloon.QueueNotify(StatsQ);
        Assert.Equal(2, _balloon.StatsUpdates);
        Assert.Equal(new VirtioBalloonStat[] { new(4, 900) }, _balloon.Stats);
        Assert.True(_balloon.RequestStats());
    }

    [Fact]
    public void Stats_ManyEntriesAreCapped_AndASecondBufferReturnsTheFirst()
    {
        Activate();
        var stats = new (ushort, ulong)[VirtioBalloon.MaxStats + 5];
        for (int i = 0; i < stats.Length; i++)
            stats[i] = ((ushort)i, (ulong)i * 10);
        WriteStats(stats);
        ushort first = _driver.AddChain(StatsQ, (StatsBuf, 10u * (uint)stats.Length, false));
        _balloon.QueueNotify(StatsQ);
        Assert.Equal(VirtioBalloon.MaxStats, _balloon.Stats.Count);
        _driver.AddChain(StatsQ, (StatsBuf, 10, false));
        _balloon.QueueNotify(StatsQ);
        Assert.Equal(1, _driver.UsedIdx(StatsQ));
        Assert.Equal(first, _driver.Used(StatsQ, 0).Id);
        Assert.Single(_balloon.Stats);
    }

    [Fact]
    public void Stats_WithoutTheFeature_AreIgnored()
    {
        Activate(~VirtioBalloonFeatures.STATS_VQ);
        WriteStats((4, 1));
        _driver.AddChain(StatsQ, (StatsBuf, 10, false));
        _balloon.QueueNotify(StatsQ);
        Assert.Equal(0, _balloon.StatsUpdates);
        Assert.False(_balloon.RequestStats());
    }

    [Fact]
    public void Fuzz_RandomPfnLists_NeverThrow()
    {
        Activate();
        var rng = new Random(777);
        for (int iter = 0; iter < 500; iter++)
        {
            int n = rng.Next(0, 64);
            var pfns = new uint[n];
            for (int i = 0; i < n; i++)
                pfns[i] = rng.Next(3) == 0 ? (uint)rng.Next() : (uint)rng.Next(0x80, 0x110);
            int q = rng.Next(3);
            if (n == 0)
                _driver.AddChain(q, ((ulong)rng.NextInt64(), (uint)rng.Next(), rng.Next(2) == 0));
            else
                Post(q, pfns);
            _balloon.QueueNotify(q);
            if (rng.Next(10) == 0)
                _balloon.RequestStats();
            Assert.False(_balloon.Broken);
        }
        Assert.True(_balloon.InflatedPages > 0);
        Assert.True(_balloon.InvalidPfns > 0);
    }
}
