using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

/// <summary>
/// <see cref="BlockRequest.Parse"/> alone (virtio 1.2 §5.2.6): framing, type and checked sector
/// range on honest and hostile chains, with no disk and no writes.
/// </summary>
public sealed class BlockRequestTests : IDisposable
{
    private const ulong Hdr = 0x20000, Buf = 0x21000, Status = 0x30000;
    private const ulong Capacity = 2048; // sectors: 1 MiB
    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);
    private readonly MockDriver _driver;
    private readonly DescriptorChain _chain = new(16);
    private readonly DiscardSegment[] _segments = new DiscardSegment[4];

    public BlockRequestTests() => _driver = new MockDriver(_memory, 16);

    public void Dispose() => _memory.Dispose();

    private void Header(uint type, ulong sector)
    {
        _memory.Write(new GuestAddress(Hdr), type);
        _memory.Write(new GuestAddress(Hdr + 4), 0u);
        _memory.Write(new GuestAddress(Hdr + 8), sector);
    }

    private bool Parse(out BlockRequest request, bool readOnly = false, params (ulong Addr, uint Len, bool Write)[] buffers)
    {
        _driver.AddChain(buffers);
        Assert.Equal(PopResult.Chain, _driver.Queue.TryPop(_memory, _chain));
        return BlockRequest.Parse(_memory, _chain, Capacity, readOnly, _segments, 1u << 17, out request);
    }

    private void Segment(int i, ulong sector, uint sectors, uint flags)
    {
        ulong at = Buf + (ulong)i * 16;
        _memory.Write(new GuestAddress(at), sector);
        _memory.Write(new GuestAddress(at + 8), sectors);
        _memory.Write(new GuestAddress(at + 12), flags);
    }

    [Fact]
    public void In_WithinCapacity_GivesOffsetLengthAndStatusAddress()
    {
        Header(BlockRequest.VIRTIO_BLK_T_IN, 8);
        Assert.True(Parse(out var r, false, (Hdr, 16, false), (Buf, 1024, true), (Status, 1, true)));
        Assert.Equal(BlockRequest.VIRTIO_BLK_S_OK, r.Status);
        Assert.Equal(8UL * 512, r.Offset);
        Assert.Equal(1024u, r.Length);
        Assert.Equal(new GuestAddress(Status), r.StatusAddress);
    }

    [Fact]
    public void StatusIsTheLastWritableByte_WhateverTheDescriptorBoundaries()
    {
        // §2.6.4: payload and status may share a descriptor.
        Header(BlockRequest.VIRTIO_BLK_T_IN, 0);
        Assert.True(Parse(out var r, false, (Hdr, 16, false), (Buf, 513, true)));
        Assert.Equal(BlockRequest.VIRTIO_BLK_S_OK, r.Status);
        Assert.Equal(512u, r.Length);
        Assert.Equal(new GuestAddress(Buf + 512), r.StatusAddress);
    }

    [Fact]
    public void NoWritableByte_IsNotARequest()
    {
        Header(BlockRequest.VIRTIO_BLK_T_IN, 0);
        Assert.False(Parse(out _, false, (Hdr, 16, false), (Buf, 512, false)));
    }

    [Theory]
    [InlineData(0UL, 2048u * 512, true)]            // the whole disk
    [InlineData(2048UL, 0u, true)]                  // empty at the end
    [InlineData(2047UL, 1024u, false)]              // one sector past the end
    [InlineData(2049UL, 0u, false)]
    [InlineData(ulong.MaxValue, 512u, false)]       // sector * 512 overflows
    [InlineData(ulong.MaxValue / 512 + 1, 0u, false)]
    public void SectorRange_IsChecked_WithoutOverflow(ulong sector, uint length, bool ok)
    {
        Assert.Equal(ok, BlockRequest.TryRange(Capacity, sector, length, out _));
    }

    [Fact]
    public void Out_BeyondCapacity_IsIoErr_AndReadOnlyRefusesWrites()
    {
        Header(BlockRequest.VIRTIO_BLK_T_OUT, Capacity);
        Assert.True(Parse(out var r, false, (Hdr, 16, false), (Buf, 512, false), (Status, 1, true)));
        Assert.Equal(BlockRequest.VIRTIO_BLK_S_IOERR, r.Status);
        Assert.NotNull(r.Error);

        Header(BlockRequest.VIRTIO_BLK_T_OUT, 0);
        Assert.True(Parse(out r, true, (Hdr, 16, false), (Buf, 512, false), (Status, 1, true)));
        Assert.Equal(BlockRequest.VIRTIO_BLK_S_IOERR, r.Status);
    }

    [Theory]
    [InlineData(BlockRequest.VIRTIO_BLK_T_IN, 100u, true)]    // not a sector multiple
    [InlineData(BlockRequest.VIRTIO_BLK_T_OUT, 512u, true)]   // OUT with a device-writable payload
    [InlineData(BlockRequest.VIRTIO_BLK_T_FLUSH, 512u, true)] // FLUSH carries no data
    [InlineData(BlockRequest.VIRTIO_BLK_T_IN, 512u, false)]   // IN with a device-readable payload
    public void BadFraming_IsIoErr(uint type, uint length, bool writable)
    {
        Header(type, 0);
        Assert.True(Parse(out var r, false, (Hdr, 16, false), (Buf, length, writable), (Status, 1, true)));
        Assert.Equal(BlockRequest.VIRTIO_BLK_S_IOERR, r.Status);
    }

    [Fact]
    public void ShortHeader_IsIoErr()
    {
        Assert.True(Parse(out var r, false, (Hdr, 15, false), (Status, 1, true)));
        Assert.Equal(BlockRequest.VIRTIO_BLK_S_IOERR, r.Status);
    }

    [Fact]
    public void UnknownType_IsUnsupp()
    {
        Header(99, 0);
        Assert.True(Parse(out var r, false, (Hdr, 16, false), (Status, 1, true)));
        Assert.Equal(BlockRequest.VIRTIO_BLK_S_UNSUPP, r.Status);
    }

    [Fact]
    public void Discard_CopiesAndChecksEverySegment()
    {
        Header(BlockRequest.VIRTIO_BLK_T_DISCARD, 0);
        Segment(0, 0, 8, 0);
        Segment(1, 100, 16, 0);
        Assert.True(Parse(out var r, false, (Hdr, 16, false), (Buf, 32, false), (Status, 1, true)));
        Assert.Equal(BlockRequest.VIRTIO_BLK_S_OK, r.Status);
        Assert.Equal(2, r.SegmentCount);
        Assert.Equal(100UL, _segments[1].Sector);
        Assert.Equal(16u, _segments[1].NumSectors);
    }

    [Theory]
    [InlineData(2040UL, 16u, 0u, BlockRequest.VIRTIO_BLK_S_IOERR)]  // past the end
    [InlineData(0UL, (1u << 17) + 1, 0u, BlockRequest.VIRTIO_BLK_S_IOERR)] // over max_discard_sectors
    [InlineData(0UL, 8u, 1u, BlockRequest.VIRTIO_BLK_S_UNSUPP)]     // UNMAP on a discard
    [InlineData(0UL, 8u, 4u, BlockRequest.VIRTIO_BLK_S_UNSUPP)]     // unknown flag
    public void Discard_BadSegment_RefusesTheWholeRequest(ulong sector, uint sectors, uint flags, byte status)
    {
        Header(BlockRequest.VIRTIO_BLK_T_DISCARD, 0);
        Segment(0, 0, 8, 0);
        Segment(1, sector, sectors, flags);
        Assert.True(Parse(out var r, false, (Hdr, 16, false), (Buf, 32, false), (Status, 1, true)));
        Assert.Equal(status, r.Status);
    }

    [Fact]
    public void Discard_TooManySegments_OrRaggedLength_IsIoErr()
    {
        Header(BlockRequest.VIRTIO_BLK_T_WRITE_ZEROES, 0);
        Assert.True(Parse(out var r, false, (Hdr, 16, false), (Buf, 5 * 16, false), (Status, 1, true)));
        Assert.Equal(BlockRequest.VIRTIO_BLK_S_IOERR, r.Status); // 5 > the 4 the caller has room for
        Header(BlockRequest.VIRTIO_BLK_T_WRITE_ZEROES, 0);
        Assert.True(Parse(out r, false, (Hdr, 16, false), (Buf, 20, false), (Status, 1, true)));
        Assert.Equal(BlockRequest.VIRTIO_BLK_S_IOERR, r.Status);
    }

    [Fact]
    public void RandomChains_NeverThrow_AndOkMeansInRange()
    {
        var random = new Random(9);
        for (int i = 0; i < 2000; i++)
        {
            Header((uint)random.Next(16), (ulong)random.NextInt64(0, 4096));
            int n = random.Next(1, 5);
            var buffers = new (ulong, uint, bool)[n];
            for (int b = 0; b < n; b++)
                buffers[b] = (Hdr + (ulong)b * 0x2000, (uint)random.Next(0, 3) * 512 + (uint)random.Next(0, 20), random.Next(2) == 0);
            _driver.AddChain(buffers);
            PopResult pop = _driver.Queue.TryPop(_memory, _chain);
            if (pop != PopResult.Chain)
                continue;
            if (!BlockRequest.Parse(_memory, _chain, Capacity, false, _segments, 1u << 17, out var r) || r.Status != BlockRequest.VIRTIO_BLK_S_OK)
                continue;
            if (r.Type is BlockRequest.VIRTIO_BLK_T_IN or BlockRequest.VIRTIO_BLK_T_OUT)
                Assert.True(r.Offset + r.Length <= Capacity * 512);
        }
    }
}
