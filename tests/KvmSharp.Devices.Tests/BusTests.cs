namespace KvmSharp.Devices.Tests;

public class BusTests
{
    private bool _stop;

    [Fact]
    public void Insert_RejectsZeroLength()
    {
        var bus = new Bus();
        Assert.Throws<ArgumentException>(() => bus.Insert(new TagDevice(1), 0x100, 0));
    }

    [Fact]
    public void Insert_RejectsRangeWrappingTheAddressSpace()
    {
        var bus = new Bus();
        Assert.Throws<ArgumentException>(() => bus.Insert(new TagDevice(1), ulong.MaxValue, 2));
        Assert.Throws<ArgumentException>(() => bus.Insert(new TagDevice(1), 2, ulong.MaxValue));
    }

    [Fact]
    public void Insert_AcceptsRangeEndingAtTheTopOfTheAddressSpace()
    {
        var bus = new Bus();
        bus.Insert(new TagDevice(7), ulong.MaxValue - 3, 4);
        Span<byte> b = stackalloc byte[4];
        Assert.True(bus.TryRead(ulong.MaxValue - 3, b));
        Assert.True(bus.TryRead(ulong.MaxValue, b[..1]));
        Assert.False(bus.TryRead(ulong.MaxValue, b[..2])); // wraps
    }

    [Fact]
    public void Insert_RejectsNullDevice()
    {
        var bus = new Bus();
        Assert.Throws<ArgumentNullException>(() => bus.Insert(null!, 0, 1));
    }

    [Theory]
    [InlineData(0x100, 0x10)] // identical
    [InlineData(0x0F8, 0x10)] // overlaps the start
    [InlineData(0x108, 0x10)] // overlaps the end
    [InlineData(0x104, 0x04)] // inside
    [InlineData(0x0F0, 0x40)] // contains
    [InlineData(0x10F, 0x01)] // last byte
    [InlineData(0x0FF, 0x02)] // one byte into the start
    public void Insert_RejectsOverlap(ulong baseAddress, ulong length)
    {
        var bus = new Bus();
        bus.Insert(new TagDevice(1), 0x100, 0x10);
        var ex = Assert.Throws<ArgumentException>(() => bus.Insert(new TagDevice(2), baseAddress, length));
        Assert.Contains("overlaps", ex.Message, StringComparison.Ordinal);
        Assert.Equal(1, bus.Count);
    }

    [Fact]
    public void Insert_AcceptsAdjacentRangesInAnyOrder()
    {
        var bus = new Bus();
        bus.Insert(new TagDevice(2), 0x110, 0x10);
        bus.Insert(new TagDevice(0), 0x0F0, 0x10);
        bus.Insert(new TagDevice(1), 0x100, 0x10);
        Assert.Equal(3, bus.Count);
        Span<byte> b = stackalloc byte[1];
        Assert.True(bus.TryRead(0x0F0, b)); Assert.Equal(0, b[0]);
        Assert.True(bus.TryRead(0x0FF, b)); Assert.Equal(0, b[0]);
        Assert.True(bus.TryRead(0x100, b)); Assert.Equal(1, b[0]);
        Assert.True(bus.TryRead(0x10F, b)); Assert.Equal(1, b[0]);
        Assert.True(bus.TryRead(0x110, b)); Assert.Equal(2, b[0]);
        Assert.True(bus.TryRead(0x11F, b)); Assert.Equal(2, b[0]);
        Assert.False(bus.TryRead(0x0EF, b));
        Assert.False(bus.TryRead(0x120, b));
    }

    [Fact]
    public void Access_PassesOffsetRelativeToBase()
    {
        var bus = new Bus();
        var dev = new RecordingDevice(0x40);
        bus.Insert(dev, 0x3F8, 8);
        Span<byte> b = stackalloc byte[2];
        Assert.True(bus.TryRead(0x3FA, b));
        Assert.Equal(2UL, dev.LastOffset);
        Assert.Equal(new byte[] { 0x42, 0x43 }, b.ToArray());
        Assert.True(bus.TryWrite(0x3FF, [0xAB]));
        Assert.Equal(7UL, dev.LastOffset);
        Assert.Equal(new byte[] { 0xAB }, dev.LastWrite);
    }

    [Fact]
    public void Access_StraddlingTheEndOfARangeIsUnclaimed()
    {
        var bus = new Bus();
        var dev = new RecordingDevice(0);
        bus.Insert(dev, 0x1000, 0x10);
        bus.Insert(new TagDevice(9), 0x1010, 0x10); // adjacent: still no straddling
        Span<byte> b = stackalloc byte[4];
        b.Fill(0xEE);
        Assert.True(bus.TryRead(0x100C, b));        // last 4 bytes
        Assert.False(bus.TryRead(0x100D, b));       // 3 inside, 1 in the neighbour
        Assert.False(bus.TryWrite(0x100F, [1, 2]));
        Assert.Equal(1, dev.Reads);
        Assert.Equal(0, dev.Writes);
    }

    [Fact]
    public void Access_BeforeFirstRangeOrInGapIsUnclaimedAndLeavesDataUntouched()
    {
        var bus = new Bus();
        bus.Insert(new TagDevice(1), 0x60, 1);
        bus.Insert(new TagDevice(2), 0x64, 1);
        Span<byte> b = [0xFF];
        Assert.False(bus.TryRead(0, b));
        Assert.False(bus.TryRead(0x61, b));
        Assert.False(bus.TryRead(0x63, b));
        Assert.False(bus.TryRead(0x65, b));
        Assert.Equal(0xFF, b[0]);
        Assert.False(new Bus().TryWrite(0x60, [0]));
    }

    [Fact]
    public void Access_WithEmptySpanIsUnclaimed()
    {
        var bus = new Bus();
        bus.Insert(new TagDevice(1), 0, 0x100);
        Assert.False(bus.TryRead(0x10, Span<byte>.Empty));
        Assert.False(bus.TryWrite(0x10, ReadOnlySpan<byte>.Empty));
    }

    [Fact]
    public void SameDeviceAtTwoRanges_SeesOffsetsOfEach()
    {
        var bus = new Bus();
        var dev = new RecordingDevice(0);
        bus.Insert(dev, 0x60, 1);
        bus.Insert(dev, 0x64, 1);
        Span<byte> b = stackalloc byte[1];
        Assert.True(bus.TryRead(0x64, b));
        Assert.Equal(0UL, dev.LastOffset);
    }

    [Fact]
    public void Remove_UnmapsOnlyTheRangeStartingThere()
    {
        var bus = new Bus();
        bus.Insert(new TagDevice(1), 0x100, 0x10);
        bus.Insert(new TagDevice(2), 0x200, 0x10);
        Assert.False(bus.Remove(0x104));
        Assert.True(bus.Remove(0x100));
        Assert.False(bus.Remove(0x100));
        Span<byte> b = stackalloc byte[1];
        Assert.False(bus.TryRead(0x100, b));
        Assert.True(bus.TryRead(0x200, b));
        bus.Insert(new TagDevice(3), 0x100, 0x100); // the space is free again
        Assert.Equal(2, bus.Count);
    }

    [Fact]
    public void ManyRanges_BinarySearchFindsEach()
    {
        var bus = new Bus();
        var order = Enumerable.Range(0, 200).OrderBy(i => (i * 7919) % 200).ToArray();
        foreach (int i in order)
            bus.Insert(new TagDevice((byte)i), (ulong)i * 0x100, 0x80);
        Span<byte> b = stackalloc byte[1];
        for (int i = 0; i < 200; i++)
        {
            Assert.True(bus.TryRead((ulong)i * 0x100 + 0x7F, b));
            Assert.Equal((byte)i, b[0]);
            Assert.False(bus.TryRead((ulong)i * 0x100 + 0x80, b));
        }
    }

    [Fact]
    public void ConcurrentReads_WhileInserting_SeeAConsistentMap()
    {
        var bus = new Bus();
        for (int i = 0; i < 16; i++)
            bus.Insert(new TagDevice((byte)(i + 1)), (ulong)i * 0x1000, 0x100);

        int failures = 0;
        int reads = 0;
        _stop = false;
        var readers = Enumerable.Range(0, 4).Select(t => new Thread(() =>
        {
            Span<byte> b = stackalloc byte[4];
            int n = 0;
            while (!Volatile.Read(ref _stop) || n < 10_000)
            {
                int i = (n++ + t) % 16;
                if (!bus.TryRead((ulong)i * 0x1000 + 0x10, b) || b[0] != i + 1 || b[3] != i + 1)
                    Interlocked.Increment(ref failures);
            }
            Interlocked.Add(ref reads, n);
        })).ToArray();
        foreach (var r in readers)
            r.Start();

        // A writer adding ranges in the gaps must never disturb readers of existing ranges.
        for (int i = 0; i < 16; i++)
        {
            bus.Insert(new TagDevice(0xEE), (ulong)i * 0x1000 + 0x800, 0x100);
            Thread.Sleep(1);
        }
        Volatile.Write(ref _stop, true);
        foreach (var r in readers)
            r.Join();

        Assert.Equal(0, failures);
        Assert.Equal(32, bus.Count);
    }

    [Fact]
    public void TryReadAndTryWrite_DoNotAllocate()
    {
        var bus = new Bus();
        for (int i = 0; i < 8; i++)
            bus.Insert(new TagDevice(1), (ulong)i * 0x10, 8);
        Span<byte> b = stackalloc byte[4];
        bus.TryRead(0x30, b); // warm up
        bus.TryWrite(0x30, b);
        bus.TryRead(0x39, b);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 10_000; i++)
        {
            bus.TryRead((ulong)(i % 0x80), b[..1]);
            bus.TryWrite((ulong)(i % 0x80), b[..1]);
        }
        Assert.Equal(before, GC.GetAllocatedBytesForCurrentThread());
    }
}
