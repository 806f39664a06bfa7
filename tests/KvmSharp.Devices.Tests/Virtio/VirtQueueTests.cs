using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

/// <summary>The driver side of a split virtqueue, written straight into guest memory (virtio-queue mock.rs).</summary>
internal sealed class MockDriver
{
    public const ulong DescAddr = 0x1000, AvailAddr = 0x3000, UsedAddr = 0x4000, DataAddr = 0x10000;
    public const ushort F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4;

    public readonly GuestMemory Memory;
    public readonly VirtQueue Queue;
    public readonly ushort Size;
    private ushort _availIdx;
    private ushort _nextDesc;

    public MockDriver(GuestMemory memory, ushort size = 16)
    {
        Memory = memory;
        Size = size;
        Queue = new VirtQueue(size)
        {
            DescriptorTable = new GuestAddress(DescAddr),
            AvailableRing = new GuestAddress(AvailAddr),
            UsedRing = new GuestAddress(UsedAddr),
            Ready = true,
        };
        Assert.True(Queue.IsValid(memory));
    }

    public void WriteDesc(ulong table, ushort index, ulong addr, uint len, ushort flags, ushort next)
    {
        ulong a = table + 16UL * index;
        Memory.Write(new GuestAddress(a), addr);
        Memory.Write(new GuestAddress(a + 8), len);
        Memory.Write(new GuestAddress(a + 12), flags);
        Memory.Write(new GuestAddress(a + 14), next);
    }

    /// <summary>Builds a direct chain from consecutive free descriptors and makes it available.</summary>
    public ushort AddChain(params (ulong Addr, uint Len, bool Write)[] buffers)
    {
        ushort head = _nextDesc;
        for (int i = 0; i < buffers.Length; i++)
        {
            ushort index = (ushort)((_nextDesc + i) % Size);
            bool last = i == buffers.Length - 1;
            ushort flags = (ushort)((buffers[i].Write ? F_WRITE : 0) | (last ? 0 : F_NEXT));
            WriteDesc(DescAddr, index, buffers[i].Addr, buffers[i].Len, flags, (ushort)((index + 1) % Size));
        }
        _nextDesc = (ushort)((_nextDesc + buffers.Length) % Size);
        Publish(head);
        return head;
    }

    public void Publish(ushort head)
    {
        Memory.Write(new GuestAddress(AvailAddr + 4 + 2UL * (ushort)(_availIdx % Size)), head);
        _availIdx++;
        Memory.Write(new GuestAddress(AvailAddr + 2), _availIdx);
    }

    public void SetAvailIdx(ushort value) => Memory.Write(new GuestAddress(AvailAddr + 2), value);

    public void SetAvailFlags(ushort value) => Memory.Write(new GuestAddress(AvailAddr), value);

    public void SetUsedEvent(ushort value) => Memory.Write(new GuestAddress(AvailAddr + 4 + 2UL * Size), value);

    public ushort UsedIdx => Memory.Read<ushort>(new GuestAddress(UsedAddr + 2));

    public ushort UsedFlags => Memory.Read<ushort>(new GuestAddress(UsedAddr));

    public ushort AvailEvent => Memory.Read<ushort>(new GuestAddress(UsedAddr + 4 + 8UL * Size));

    public (uint Id, uint Len) Used(ushort i)
    {
        ulong a = UsedAddr + 4 + 8UL * (ushort)(i % Size);
        return (Memory.Read<uint>(new GuestAddress(a)), Memory.Read<uint>(new GuestAddress(a + 4)));
    }
}

public sealed class VirtQueueTests : IDisposable
{
    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);

    public void Dispose() => _memory.Dispose();

    [Fact]
    public void Constructor_RejectsBadMaxSize()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new VirtQueue(0));
        Assert.Throws<ArgumentOutOfRangeException>(() => new VirtQueue(3));
        Assert.Throws<ArgumentOutOfRangeException>(() => new VirtQueue(65535));
        Assert.Equal(VirtQueue.MaxQueueSize, new VirtQueue(32768).MaxSize);
    }

    [Fact]
    public void IsValid_ChecksReadySizeAlignmentAndRanges()
    {
        var d = new MockDriver(_memory);
        var q = d.Queue;
        q.Size = 12;
        Assert.False(q.IsValid(_memory));
        q.Size = 32; // above max
        Assert.False(q.IsValid(_memory));
        q.Size = 8;
        Assert.True(q.IsValid(_memory));
        q.DescriptorTable = new GuestAddress(0x1008);
        Assert.False(q.IsValid(_memory));
        q.DescriptorTable = new GuestAddress(MockDriver.DescAddr);
        q.AvailableRing = new GuestAddress(0x3001);
        Assert.False(q.IsValid(_memory));
        q.AvailableRing = new GuestAddress(MockDriver.AvailAddr);
        q.UsedRing = new GuestAddress(0x4002);
        Assert.False(q.IsValid(_memory));
        q.UsedRing = new GuestAddress((1UL << 20) - 16); // runs out of RAM
        Assert.False(q.IsValid(_memory));
        q.UsedRing = new GuestAddress(MockDriver.UsedAddr);
        q.Ready = false;
        Assert.False(q.IsValid(_memory));
        q.Reset();
        Assert.Equal(16, q.Size);
        Assert.False(q.Ready);
    }

    [Fact]
    public void PopReadWriteAddUsed_RoundTrip()
    {
        var d = new MockDriver(_memory);
        _memory.Write(new GuestAddress(MockDriver.DataAddr), "hello, "u8);
        _memory.Write(new GuestAddress(MockDriver.DataAddr + 0x100), "device"u8);
        ushort head = d.AddChain(
            (MockDriver.DataAddr, 7, false),
            (MockDriver.DataAddr + 0x100, 6, false),
            (MockDriver.DataAddr + 0x200, 4, true),
            (MockDriver.DataAddr + 0x300, 8, true));

        var chain = new DescriptorChain(d.Queue.MaxSize);
        Assert.Equal(1, d.Queue.PendingCount(_memory));
        Assert.Equal(PopResult.Chain, d.Queue.TryPop(_memory, chain));
        Assert.Equal(head, chain.Head);
        Assert.Equal(2, chain.Readable.Length);
        Assert.Equal(2, chain.Writable.Length);
        Assert.Equal(13u, chain.ReadableLength);
        Assert.Equal(12u, chain.WritableLength);

        var reader = new ChainReader(_memory, chain);
        var buf = new byte[32];
        Assert.Equal(13, reader.Read(buf));
        Assert.Equal("hello, device"u8.ToArray(), buf[..13]);
        Assert.Equal(0u, reader.Remaining);

        var writer = new ChainWriter(_memory, chain);
        Assert.True(writer.TryWrite(0x0102030405060708UL)); // crosses the 4/8 buffer boundary
        Assert.Equal(4, writer.Write("abcdefgh"u8));        // only 4 left
        Assert.Equal(12u, writer.BytesWritten);
        Assert.False(writer.TryWrite((byte)1));
        Assert.Equal(0x05060708u, _memory.Read<uint>(new GuestAddress(MockDriver.DataAddr + 0x200)));
        var second = new byte[8];
        _memory.Read(new GuestAddress(MockDriver.DataAddr + 0x300), second);
        Assert.Equal(new byte[] { 4, 3, 2, 1, (byte)'a', (byte)'b', (byte)'c', (byte)'d' }, second);

        Assert.True(d.Queue.TryAddUsed(_memory, chain.Head, writer.BytesWritten));
        Assert.Equal(1, d.UsedIdx);
        Assert.Equal(((uint)head, 12u), d.Used(0));
        Assert.Equal(PopResult.Empty, d.Queue.TryPop(_memory, chain));
    }

    [Fact]
    public void Reader_TryReadIsAllOrNothing_AndSkipWorksAcrossBuffers()
    {
        var d = new MockDriver(_memory);
        _memory.Write(new GuestAddress(MockDriver.DataAddr), new byte[] { 1, 2, 3 });
        _memory.Write(new GuestAddress(MockDriver.DataAddr + 0x100), new byte[] { 4, 5, 6 });
        d.AddChain((MockDriver.DataAddr, 3, false), (MockDriver.DataAddr + 0x100, 3, false));
        var chain = new DescriptorChain(16);
        Assert.Equal(PopResult.Chain, d.Queue.TryPop(_memory, chain));
        var reader = new ChainReader(_memory, chain);
        Assert.Equal(2u, reader.Skip(2));
        Assert.True(reader.TryRead(out ushort x));
        Assert.Equal(0x0403, x);
        Assert.False(reader.TryRead(out uint _)); // only 2 left
        Assert.Equal(2u, reader.Remaining);
        Assert.Equal(2u, reader.Skip(100));
    }

    [Fact]
    public void ZeroLengthDescriptors_AreSkipped()
    {
        var d = new MockDriver(_memory);
        d.AddChain((MockDriver.DataAddr, 0, false), (MockDriver.DataAddr, 4, true), (0xFFFF_FFFF_0000, 0, true));
        var chain = new DescriptorChain(16);
        Assert.Equal(PopResult.Chain, d.Queue.TryPop(_memory, chain));
        Assert.Equal(0, chain.Readable.Length);
        Assert.Equal(1, chain.Writable.Length);
    }

    [Fact]
    public void IndirectTable_IsFollowed()
    {
        var d = new MockDriver(_memory);
        const ulong table = 0x8000;
        d.WriteDesc(table, 0, MockDriver.DataAddr, 16, MockDriver.F_NEXT, 2);
        d.WriteDesc(table, 2, MockDriver.DataAddr + 0x100, 32, (ushort)(MockDriver.F_WRITE | MockDriver.F_NEXT), 1);
        d.WriteDesc(table, 1, MockDriver.DataAddr + 0x200, 1, MockDriver.F_WRITE, 0);
        d.WriteDesc(MockDriver.DescAddr, 5, table, 3 * 16, MockDriver.F_INDIRECT, 0);
        d.Publish(5);
        var chain = new DescriptorChain(16);
        Assert.Equal(PopResult.Chain, d.Queue.TryPop(_memory, chain));
        Assert.Equal(5, chain.Head);
        Assert.Equal(16u, chain.ReadableLength);
        Assert.Equal(33u, chain.WritableLength);
        Assert.Equal(new GuestAddress(MockDriver.DataAddr + 0x200), chain.Writable[1].Address);
    }

    /// <summary>
    /// Linux's virtio-blk puts a 1 MiB request (seg_max = queue size - 2 data segments plus header
    /// and status) into one indirect table of queue-size entries: the descriptor pointing at the
    /// table must not count against the chain's length. Once it did, and such requests were
    /// returned unused while the guest believed them done.
    /// </summary>
    [Fact]
    public void IndirectTableOfQueueSizeEntries_IsOneChain()
    {
        var d = new MockDriver(_memory);
        const ulong table = 0x8000;
        for (ushort i = 0; i < 16; i++)
            d.WriteDesc(table, i, MockDriver.DataAddr + i * 0x10u, 0x10, (ushort)((i == 15 ? MockDriver.F_WRITE : 0) | (i < 15 ? MockDriver.F_NEXT : 0)), (ushort)(i + 1));
        d.WriteDesc(MockDriver.DescAddr, 5, table, 16 * 16, MockDriver.F_INDIRECT, 0);
        d.Publish(5);
        var chain = new DescriptorChain(16);
        Assert.Equal(PopResult.Chain, d.Queue.TryPop(_memory, chain));
        Assert.Equal(15, chain.Readable.Length);
        Assert.Equal(1, chain.Writable.Length);
    }

    [Fact]
    public void IndirectTableLongerThanTheQueue_IsMalformed()
    {
        var d = new MockDriver(_memory);
        const ulong table = 0x8000;
        for (ushort i = 0; i < 17; i++)
            d.WriteDesc(table, i, MockDriver.DataAddr, 0x10, (ushort)(i < 16 ? MockDriver.F_NEXT : 0), (ushort)(i + 1));
        d.WriteDesc(MockDriver.DescAddr, 5, table, 17 * 16, MockDriver.F_INDIRECT, 0);
        d.Publish(5);
        Assert.Equal(PopResult.BadChain, d.Queue.TryPop(_memory, new DescriptorChain(16)));
    }

    public static TheoryData<string> BadChains => ["loop", "next out of range", "nested indirect", "indirect with next",
        "indirect length", "indirect empty", "readable after writable", "buffer outside RAM", "buffer wraps", "too long",
        "indirect table outside RAM", "indirect next out of table"];

    [Theory]
    [MemberData(nameof(BadChains))]
    public void MalformedChain_IsReportedWithItsHead(string kind)
    {
        var d = new MockDriver(_memory);
        const ulong table = 0x8000;
        ulong data = MockDriver.DataAddr;
        ushort F_NEXT = MockDriver.F_NEXT, F_WRITE = MockDriver.F_WRITE, F_INDIRECT = MockDriver.F_INDIRECT;
        switch (kind)
        {
            case "loop":
                d.WriteDesc(MockDriver.DescAddr, 3, data, 1, F_NEXT, 4);
                d.WriteDesc(MockDriver.DescAddr, 4, data, 1, F_NEXT, 3);
                break;
            case "next out of range":
                d.WriteDesc(MockDriver.DescAddr, 3, data, 1, F_NEXT, 16);
                break;
            case "nested indirect":
                d.WriteDesc(table, 0, table + 0x100, 16, F_INDIRECT, 0);
                d.WriteDesc(MockDriver.DescAddr, 3, table, 16, F_INDIRECT, 0);
                break;
            case "indirect with next":
                d.WriteDesc(table, 0, data, 1, 0, 0);
                d.WriteDesc(MockDriver.DescAddr, 3, table, 16, (ushort)(F_INDIRECT | F_NEXT), 4);
                d.WriteDesc(MockDriver.DescAddr, 4, data, 1, 0, 0);
                break;
            case "indirect length":
                d.WriteDesc(MockDriver.DescAddr, 3, table, 24, F_INDIRECT, 0);
                break;
            case "indirect empty":
                d.WriteDesc(MockDriver.DescAddr, 3, table, 0, F_INDIRECT, 0);
                break;
            case "readable after writable":
                d.WriteDesc(MockDriver.DescAddr, 3, data, 1, (ushort)(F_WRITE | F_NEXT), 4);
                d.WriteDesc(MockDriver.DescAddr, 4, data, 1, 0, 0);
                break;
            case "buffer outside RAM":
                d.WriteDesc(MockDriver.DescAddr, 3, (1UL << 20) - 2, 4, 0, 0);
                break;
            case "buffer wraps":
                d.WriteDesc(MockDriver.DescAddr, 3, ulong.MaxValue - 1, 4, 0, 0);
                break;
            case "too long":
                for (ushort i = 0; i < 16; i++)
                    d.WriteDesc(MockDriver.DescAddr, i, data, 1, F_NEXT, (ushort)((i + 1) % 16)); // a 16-cycle
                break;
            case "indirect table outside RAM":
                d.WriteDesc(MockDriver.DescAddr, 3, (1UL << 20) - 16, 32, F_INDIRECT, 0);
                break;
            case "indirect next out of table":
                d.WriteDesc(table, 0, data, 1, F_NEXT, 2);
                d.WriteDesc(MockDriver.DescAddr, 3, table, 32, F_INDIRECT, 0);
                break;
        }
        d.Publish(3);
        var chain = new DescriptorChain(16);
        Assert.Equal(PopResult.BadChain, d.Queue.TryPop(_memory, chain));
        Assert.Equal(3, chain.Head);
        Assert.Equal(1, d.Queue.NextAvailable); // consumed: the device returns it with length 0
        Assert.True(d.Queue.TryAddUsed(_memory, chain.Head, 0));
    }

    [Fact]
    public void AvailableIndexTooFarAhead_IsABrokenRing()
    {
        var d = new MockDriver(_memory);
        d.SetAvailIdx(17);
        Assert.Equal(-1, d.Queue.PendingCount(_memory));
        Assert.Equal(PopResult.BrokenRing, d.Queue.TryPop(_memory, new DescriptorChain(16)));
    }

    [Fact]
    public void HeadIndexOutOfRange_IsABrokenRing()
    {
        var d = new MockDriver(_memory);
        d.Publish(16);
        Assert.Equal(PopResult.BrokenRing, d.Queue.TryPop(_memory, new DescriptorChain(16)));
    }

    [Fact]
    public void Indices_WrapAt65536()
    {
        var d = new MockDriver(_memory, size: 4);
        var chain = new DescriptorChain(4);
        for (int i = 0; i < 70_000; i++)
        {
            d.AddChain((MockDriver.DataAddr, 4, true));
            Assert.Equal(PopResult.Chain, d.Queue.TryPop(_memory, chain));
            Assert.True(d.Queue.TryAddUsed(_memory, chain.Head, 4));
        }
        Assert.Equal(unchecked((ushort)70_000), d.UsedIdx);
        Assert.Equal(unchecked((ushort)70_000), d.Queue.NextAvailable);
    }

    [Fact]
    public void Notification_WithoutEventIdx_FollowsNoInterruptFlag()
    {
        var d = new MockDriver(_memory);
        d.Queue.TryAddUsed(_memory, 0, 0);
        Assert.True(d.Queue.NeedsNotification(_memory));
        d.SetAvailFlags(1); // VIRTQ_AVAIL_F_NO_INTERRUPT
        Assert.False(d.Queue.NeedsNotification(_memory));
    }

    [Fact]
    public void Notification_WithEventIdx_FiresWhenUsedIdxPassesUsedEvent()
    {
        var d = new MockDriver(_memory);
        d.Queue.EventIndex = true;
        d.Queue.TryAddUsed(_memory, 0, 0);
        Assert.True(d.Queue.NeedsNotification(_memory)); // first time: always
        d.SetUsedEvent(3); // "interrupt me when entry 3 is used" (used.idx goes 3 -> 4)
        d.Queue.TryAddUsed(_memory, 0, 0);               // idx 2
        Assert.False(d.Queue.NeedsNotification(_memory));
        d.Queue.TryAddUsed(_memory, 0, 0);               // idx 3
        Assert.False(d.Queue.NeedsNotification(_memory));
        d.Queue.TryAddUsed(_memory, 0, 0);               // idx 4: passed 3
        Assert.True(d.Queue.NeedsNotification(_memory));
        d.Queue.TryAddUsed(_memory, 0, 0);               // idx 5
        Assert.False(d.Queue.NeedsNotification(_memory));
    }

    [Fact]
    public void WriteUsed_IsInvisibleUntilPublished_ThenAllAppearInOneStore()
    {
        var d = new MockDriver(_memory, size: 4);
        // Start at used.idx 3 so the batch wraps round the ring's slots.
        for (ushort i = 0; i < 3; i++)
            Assert.True(d.Queue.TryAddUsed(_memory, i, 1));
        Assert.Equal(3, d.UsedIdx);

        Assert.True(d.Queue.TryWriteUsed(_memory, 7, 100));
        Assert.Equal(3, d.UsedIdx); // the driver must not see a partial batch
        Assert.True(d.Queue.TryWriteUsed(_memory, 8, 200));
        Assert.True(d.Queue.TryWriteUsed(_memory, 9, 300));
        Assert.Equal(3, d.UsedIdx);
        Assert.Equal(3, d.Queue.NextUsed);
        Assert.Equal(3, d.Queue.UnpublishedUsed);
        // The elements are already in their slots (3, 0, 1), ahead of used.idx.
        Assert.Equal((7u, 100u), d.Used(3));
        Assert.Equal((8u, 200u), d.Used(4));
        Assert.Equal((9u, 300u), d.Used(5));

        Assert.True(d.Queue.TryPublishUsed(_memory));
        Assert.Equal(6, d.UsedIdx);
        Assert.Equal(6, d.Queue.NextUsed);
        Assert.Equal(0, d.Queue.UnpublishedUsed);
        Assert.True(d.Queue.TryPublishUsed(_memory)); // nothing to publish: no change
        Assert.Equal(6, d.UsedIdx);
    }

    [Fact]
    public void WriteUsed_RefusesMoreThanAQueueSizeUnpublished()
    {
        var d = new MockDriver(_memory, size: 4);
        for (ushort i = 0; i < 4; i++)
            Assert.True(d.Queue.TryWriteUsed(_memory, i, 0));
        // A fifth would overwrite slot 0 before the driver saw it: only a driver that reused
        // descriptors it had not got back gets here.
        Assert.False(d.Queue.TryWriteUsed(_memory, 4, 0));
        Assert.Equal((0u, 0u), d.Used(0));
        Assert.True(d.Queue.TryPublishUsed(_memory));
        Assert.Equal(4, d.UsedIdx);
        Assert.True(d.Queue.TryWriteUsed(_memory, 4, 0));
        d.Queue.Reset();
        Assert.Equal(0, d.Queue.UnpublishedUsed);
    }

    [Fact]
    public void Notification_WithEventIdx_IsDecidedOverTheWholeBatch()
    {
        var d = new MockDriver(_memory);
        d.Queue.EventIndex = true;
        d.Queue.TryAddUsed(_memory, 0, 0);
        Assert.True(d.Queue.NeedsNotification(_memory)); // first time: always; old = 1
        d.SetUsedEvent(2); // interrupt when entry 2 is used: used.idx passes 2 -> 3
        for (ushort i = 0; i < 3; i++)
            Assert.True(d.Queue.TryWriteUsed(_memory, i, 0));
        Assert.True(d.Queue.TryPublishUsed(_memory));    // used.idx 1 -> 4 in one step, over 2
        Assert.True(d.Queue.NeedsNotification(_memory)); // vring_need_event(2, new 4, old 1)
        for (ushort i = 0; i < 2; i++)
            Assert.True(d.Queue.TryWriteUsed(_memory, i, 0));
        Assert.True(d.Queue.TryPublishUsed(_memory));    // 4 -> 6: used_event 2 is behind
        Assert.False(d.Queue.NeedsNotification(_memory));
    }

    [Fact]
    public void Notification_WithEventIdx_AfterUsedIdxWentAllTheWayRound_Interrupts()
    {
        var d = new MockDriver(_memory, size: 4);
        d.Queue.EventIndex = true;
        d.Queue.TryAddUsed(_memory, 0, 0);
        Assert.True(d.Queue.NeedsNotification(_memory)); // remembered: used.idx 1
        // 65536 entries without asking (and so without signalling): used.idx is 1 again, and
        // vring_need_event against the remembered 1 would see "nothing new" whatever used_event is.
        for (int i = 0; i < 65536 / 4; i++)
        {
            for (ushort j = 0; j < 4; j++)
                Assert.True(d.Queue.TryWriteUsed(_memory, j, 0));
            Assert.True(d.Queue.TryPublishUsed(_memory));
        }
        Assert.Equal(1, d.UsedIdx);
        d.SetUsedEvent(0);
        Assert.True(d.Queue.NeedsNotification(_memory)); // the driver has 65536 unseen entries
        d.Queue.TryAddUsed(_memory, 0, 0);                // 2: used_event 0 is behind again
        Assert.False(d.Queue.NeedsNotification(_memory));
    }

    [Fact]
    public void EnableDisableNotification_WriteTheDeviceArea()
    {
        var d = new MockDriver(_memory);
        d.Queue.DisableNotification(_memory);
        Assert.Equal(1, d.UsedFlags);
        Assert.False(d.Queue.EnableNotification(_memory));
        Assert.Equal(0, d.UsedFlags);
        d.AddChain((MockDriver.DataAddr, 1, false));
        Assert.True(d.Queue.EnableNotification(_memory));

        d.Queue.EventIndex = true;
        d.Queue.TryPop(_memory, new DescriptorChain(16));
        d.Queue.EnableNotification(_memory);
        Assert.Equal(1, d.AvailEvent);
    }

    [Fact]
    public void PopAndAddUsed_DoNotAllocate()
    {
        var d = new MockDriver(_memory);
        var chain = new DescriptorChain(16);
        Span<byte> buf = stackalloc byte[8];
        void Cycle(Span<byte> b)
        {
            d.Queue.TryPop(_memory, chain);
            var r = new ChainReader(_memory, chain);
            r.Read(b);
            var w = new ChainWriter(_memory, chain);
            w.Write(b);
            d.Queue.TryAddUsed(_memory, chain.Head, w.BytesWritten);
            d.Queue.NeedsNotification(_memory);
        }
        var heads = new List<ushort>();
        for (int i = 0; i < 8; i++)
            heads.Add(d.AddChain((MockDriver.DataAddr, 8, false), (MockDriver.DataAddr + 0x100, 8, true)));
        Cycle(buf);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 7; i++)
            Cycle(buf);
        Assert.Equal(before, GC.GetAllocatedBytesForCurrentThread());
    }

    /// <summary>
    /// Hostile input (style.md §7): random descriptor tables and rings, fixed seeds. The queue must
    /// never throw, never loop, and every chain it accepts must lie inside RAM.
    /// </summary>
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(4)]
    public void RandomRings_NeverThrowAndOnlyYieldChainsInsideRam(int seed)
    {
        var random = new Random(seed);
        var chain = new DescriptorChain(16);
        int accepted = 0, rejected = 0;
        for (int round = 0; round < 2000; round++)
        {
            var d = new MockDriver(_memory);
            var table = new byte[16 * 16 + 0x100];
            random.NextBytes(table);
            // Bias addresses and lengths toward plausible values so parsing gets deep.
            for (int i = 0; i < 16; i++)
            {
                if (random.Next(3) != 0)
                    BitConverter.TryWriteBytes(table.AsSpan(16 * i), (ulong)random.Next(0, 1 << 21));
                if (random.Next(3) != 0)
                    BitConverter.TryWriteBytes(table.AsSpan(16 * i + 8), (uint)random.Next(0, 0x2000));
                if (random.Next(2) != 0)
                    BitConverter.TryWriteBytes(table.AsSpan(16 * i + 12), (ushort)random.Next(0, 8));
                if (random.Next(2) != 0)
                    BitConverter.TryWriteBytes(table.AsSpan(16 * i + 14), (ushort)random.Next(0, 20));
            }
            _memory.Write(new GuestAddress(MockDriver.DescAddr), table.AsSpan(0, 16 * 16));
            _memory.Write(new GuestAddress(0x8000), table); // a possible indirect table target
            _memory.Write(new GuestAddress(MockDriver.AvailAddr), table.AsSpan(0, 40));
            if (random.Next(2) == 0)
                d.SetAvailIdx((ushort)random.Next(0, 18));

            for (int pops = 0; pops < 20; pops++)
            {
                var result = d.Queue.TryPop(_memory, chain);
                if (result is PopResult.Empty or PopResult.BrokenRing)
                    break;
                Assert.True(chain.Head < 16);
                if (result == PopResult.BadChain)
                    rejected++;
                if (result == PopResult.Chain)
                {
                    accepted++;
                    foreach (var s in chain.Readable)
                        Assert.True(_memory.IsValidRange(s.Address, s.Length));
                    foreach (var s in chain.Writable)
                        Assert.True(_memory.IsValidRange(s.Address, s.Length));
                    Assert.True(chain.Readable.Length + chain.Writable.Length <= 16);
                }
            }
            _memory.TryZero(new GuestAddress(0), 0x10000);
        }
        // Not vacuous: both outcomes were exercised.
        Assert.True(accepted > 50, $"accepted {accepted}");
        Assert.True(rejected > 50, $"rejected {rejected}");
    }
}
