using KvmSharp.Memory;
using Xunit;

namespace KvmSharp.Memory.Tests;

public sealed class GuestMemoryTests : IDisposable
{
    // Two regions with a hole between them, as the x86 layout has around the MMIO hole.
    private readonly GuestMemory _mem = GuestMemory.CreateForTesting([(new GuestAddress(0), 0x10000), (new GuestAddress(0x20000), 0x10000)]);

    public void Dispose() => _mem.Dispose();

    [Fact]
    public void ReadWriteRoundTripInsideARegion()
    {
        _mem.Write(new GuestAddress(0x1234), new byte[] { 1, 2, 3, 4 });
        var buf = new byte[4];
        _mem.Read(new GuestAddress(0x1234), buf);
        Assert.Equal(new byte[] { 1, 2, 3, 4 }, buf);
        Assert.Equal(0x04030201u, _mem.Read<uint>(new GuestAddress(0x1234)));
    }

    [Theory]
    [InlineData(0xFFFFUL, 2)]            // straddles the end of region 0 into the hole
    [InlineData(0x10000UL, 1)]           // in the hole
    [InlineData(0x2FFFFUL, 2)]           // past the end of RAM
    [InlineData(ulong.MaxValue, 1)]      // top of the address space
    [InlineData(ulong.MaxValue - 2, 8)]  // wraps around 2^64
    public void AccessesOutsideRamFailAndWriteNothing(ulong address, int length)
    {
        var data = Enumerable.Repeat((byte)0xAB, length).ToArray();
        Assert.False(_mem.TryWrite(new GuestAddress(address), data));
        Assert.False(_mem.TryRead(new GuestAddress(address), new byte[length]));
        Assert.False(_mem.IsValidRange(new GuestAddress(address), (ulong)length));
        Assert.Throws<GuestMemoryException>(() => _mem.Write(new GuestAddress(address), data));
        // Nothing leaked into the bytes that are RAM.
        Assert.Equal(0, _mem.Read<byte>(new GuestAddress(0xFFFF)));
    }

    [Fact]
    public void AdjacentRegionsAreCrossedTransparently()
    {
        using var mem = GuestMemory.CreateForTesting([(new GuestAddress(0), 0x1000), (new GuestAddress(0x1000), 0x1000)]);
        var data = Enumerable.Range(0, 32).Select(i => (byte)i).ToArray();
        Assert.True(mem.TryWrite(new GuestAddress(0xFF0), data));
        var back = new byte[32];
        Assert.True(mem.TryRead(new GuestAddress(0xFF0), back));
        Assert.Equal(data, back);
        Assert.False(mem.TryGetSpan(new GuestAddress(0xFF0), 32, out _)); // a span never crosses regions
        Assert.True(mem.TryGetSpan(new GuestAddress(0xFF0), 16, out var span));
        Assert.Equal(16, span.Length);
    }

    [Fact]
    public void ZeroAndEmptyRangesFollowTheSameWalk()
    {
        using var mem = GuestMemory.CreateForTesting([(new GuestAddress(0), 0x1000), (new GuestAddress(0x1000), 0x1000)]);
        mem.Write(new GuestAddress(0xFF0), Enumerable.Repeat((byte)7, 32).ToArray());
        Assert.True(mem.TryZero(new GuestAddress(0xFF8), 16)); // across the two regions
        Assert.Equal(new byte[] { 7, 0, 0, 7 }, new byte[] { mem.Read<byte>(new(0xFF7)), mem.Read<byte>(new(0xFF8)), mem.Read<byte>(new(0x1007)), mem.Read<byte>(new(0x1008)) });
        Assert.False(mem.TryZero(new GuestAddress(0x1FF8), 16)); // past the end: nothing written
        Assert.True(mem.IsValidRange(new GuestAddress(0x5000), 0)); // an empty range is valid anywhere
        Assert.True(mem.TryGetSpan(new GuestAddress(0x10), 0, out _));
        Assert.False(mem.TryGetSpan(new GuestAddress(0x5000), 0, out _)); // but a span needs RAM under it
    }

    [Fact]
    public void AccessorsAllocateNothing()
    {
        Span<byte> buffer = stackalloc byte[64];
        _mem.TryWrite(new GuestAddress(0xFFC0), buffer); // warm up
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 1000; i++)
        {
            _mem.TryWrite(new GuestAddress(0xFFC0), buffer);
            _mem.TryRead(new GuestAddress(0xFFC0), buffer);
            _mem.TryZero(new GuestAddress(0x20000), 64);
            _mem.IsValidRange(new GuestAddress(0xFFF0), 64);
            _mem.TryRead(new GuestAddress(0x100), out ulong _);
        }
        Assert.Equal(before, GC.GetAllocatedBytesForCurrentThread());
    }

    [Fact]
    public void SpanAndAlignedPointerChecks()
    {
        Assert.False(_mem.TryGetSpan(new GuestAddress(0x100), -1, out _));
        Assert.False(_mem.TryGetSpan(new GuestAddress(0xFFF8), 16, out _));
        Assert.False(_mem.TryReadVolatileUInt16(new GuestAddress(0x101), out _)); // misaligned
        Assert.True(_mem.TryWriteVolatileUInt16(new GuestAddress(0x100), 0xBEEF));
        Assert.True(_mem.TryReadVolatileUInt16(new GuestAddress(0x100), out ushort v));
        Assert.Equal(0xBEEF, v);
        Assert.False(_mem.TryWriteVolatileUInt16(new GuestAddress(0x10000), 1));
    }

    [Fact]
    public void DiscardZeroesWholePagesOnly()
    {
        _mem.Write(new GuestAddress(0x2000), new byte[] { 9, 9, 9 });
        Assert.False(_mem.TryDiscard(new GuestAddress(0x2001), 0x1000)); // unaligned
        Assert.False(_mem.TryDiscard(new GuestAddress(0xF000), 0x2000)); // runs into the hole
        Assert.True(_mem.TryDiscard(new GuestAddress(0x2000), 0x1000));
        Assert.Equal(0, _mem.Read<byte>(new GuestAddress(0x2000)));
    }

    [Fact]
    public void OverlappingOrEmptyRegionsAreRefused()
    {
        Assert.Throws<ArgumentException>(() => GuestMemory.CreateForTesting([(new GuestAddress(0), 0x2000), (new GuestAddress(0x1000), 0x1000)]));
        Assert.Throws<ArgumentException>(() => GuestMemory.CreateForTesting([(new GuestAddress(0), 0)]));
        Assert.Throws<ArgumentException>(() => GuestMemory.CreateForTesting([(new GuestAddress(ulong.MaxValue - 10), 0x1000)]));
    }

    [Fact]
    public void AnonymousMappingIsUsableAndMergeable()
    {
        using var mem = GuestMemory.CreateAnonymous([(new GuestAddress(0), 1 << 20)], new GuestMemoryOptions { Mergeable = true });
        mem.Write(new GuestAddress(0x80000), 0x1122334455667788UL);
        Assert.Equal(0x1122334455667788UL, mem.Read<ulong>(new GuestAddress(0x80000)));
        Assert.True(mem.TryDiscard(new GuestAddress(0x80000), 0x1000));
        Assert.Equal(0UL, mem.Read<ulong>(new GuestAddress(0x80000)));
    }

    [Fact]
    public void PrefaultMakesAllOfRamResidentAndDiscardReleasesIt()
    {
        const ulong Size = 64UL << 20;
        long before = RssAnonKiB();
        using (GuestMemory.CreateAnonymous([(new GuestAddress(0), Size)]))
            Assert.InRange(RssAnonKiB() - before, long.MinValue, 8 * 1024); // lazily mapped
        before = RssAnonKiB();
        using var mem = GuestMemory.CreateAnonymous([(new GuestAddress(0), Size)], new GuestMemoryOptions { Prefault = true });
        long populated = RssAnonKiB();
        Assert.InRange(populated - before, 60 * 1024, long.MaxValue);
        Assert.True(mem.TryDiscard(new GuestAddress(0), Size / 2));
        Assert.InRange(populated - RssAnonKiB(), 28 * 1024, long.MaxValue);
    }

    private static long RssAnonKiB()
    {
        foreach (string line in File.ReadLines("/proc/self/status"))
        {
            if (line.StartsWith("RssAnon:", StringComparison.Ordinal))
                return long.Parse(line.AsSpan(8).Trim().TrimEnd("kB").Trim(), System.Globalization.CultureInfo.InvariantCulture);
        }
        throw new InvalidOperationException("no RssAnon in /proc/self/status");
    }
}

public class MemoryLayoutTests
{
    [Fact]
    public void SmallGuestsAreOneRegionFromZero()
    {
        var r = MemoryLayout.RamRanges(512UL << 20);
        Assert.Equal([(new GuestAddress(0), 512UL << 20)], r);
    }

    [Fact]
    public void LargeGuestsSkipTheMmioHole()
    {
        var r = MemoryLayout.RamRanges(5UL << 30);
        Assert.Equal(2, r.Count);
        Assert.Equal((new GuestAddress(0), 3UL << 30), r[0]);
        Assert.Equal((new GuestAddress(4UL << 30), 2UL << 30), r[1]);
    }

    [Theory]
    [InlineData(0UL)]
    [InlineData(4095UL)]
    [InlineData((1UL << 40) + 4096)]
    public void BadSizesAreRefused(ulong size) => Assert.Throws<ArgumentOutOfRangeException>(() => MemoryLayout.RamRanges(size));
}
