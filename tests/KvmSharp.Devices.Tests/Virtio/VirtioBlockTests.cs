using System.Buffers.Binary;
using KvmSharp.Devices.Virtio;
using KvmSharp.Images;
using KvmSharp.Images.Qcow2;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

/// <summary>virtio-blk over a real <see cref="RawImage"/> in a temp file, driven by a mock driver.</summary>
public sealed class VirtioBlockTests : IDisposable
{
    private const ulong Hdr = 0x10000, Data = 0x11000, Status = 0x1F000, Segs = 0x1E000;
    private const uint T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_DISCARD = 11, T_WRITE_ZEROES = 13;
    private const byte S_OK = 0, S_IOERR = 1, S_UNSUPP = 2;
    private const ulong DiskSize = 64 * 1024;

    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20), (new GuestAddress(1UL << 20), 1UL << 20)]);
    private readonly string _path = Path.Combine(Path.GetTempPath(), $"kvmsharp-vblk-{Guid.NewGuid():N}.raw");
    private readonly CountingInterrupt _irq = new();
    private MockDriver _driver = null!;
    private RawImage _image = null!;
    private VirtioBlock _blk = null!;

    public VirtioBlockTests()
    {
        RawImage.Create(_path, DiskSize);
        // A recognisable pattern: byte i of the disk is (i * 7 + i / 512) & 0xFF.
        var pattern = new byte[DiskSize];
        for (int i = 0; i < pattern.Length; i++)
            pattern[i] = (byte)(i * 7 + i / 512);
        File.WriteAllBytes(_path, pattern);
    }

    public void Dispose()
    {
        _blk?.Dispose();
        _image?.Dispose();
        _memory.Dispose();
        File.Delete(_path);
    }

    private void Start(bool readOnly = false, ulong features = ~0UL)
    {
        _image = RawImage.Open(_path, readOnly);
        _blk = new VirtioBlock(_image, "kvmsharp-disk0", queueSize: 16);
        _driver = new MockDriver(_memory, 16);
        Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures & features, [_driver.Queue], _irq));
    }

    private void Header(uint type, ulong sector, ulong at = Hdr)
    {
        _memory.Write(new GuestAddress(at), type);
        _memory.Write(new GuestAddress(at + 4), 0u);
        _memory.Write(new GuestAddress(at + 8), sector);
    }

    /// <summary>Submits one chain, runs the queue, returns (used length, status byte).</summary>
    private (uint Len, byte Status) Submit(params (ulong Addr, uint Len, bool Write)[] buffers)
    {
        _memory.Write(new GuestAddress(Status), (byte)0xEE);
        ushort used = _driver.UsedIdx;
        ushort head = _driver.AddChain(buffers);
        _blk.QueueNotify(0); _blk.WaitIdle();
        Assert.Equal((ushort)(used + 1), _driver.UsedIdx);
        var (id, len) = _driver.Used(used);
        Assert.Equal(head, id);
        return (len, _memory.Read<byte>(new GuestAddress(Status)));
    }

    private (uint Len, byte Status) Read(ulong sector, uint length, ulong at = Data)
    {
        Header(T_IN, sector);
        return Submit((Hdr, 16, false), (at, length, true), (Status, 1, true));
    }

    private (uint Len, byte Status) Write(ulong sector, uint length, ulong at = Data)
    {
        Header(T_OUT, sector);
        return Submit((Hdr, 16, false), (at, length, false), (Status, 1, true));
    }

    private byte[] Disk() => File.ReadAllBytes(_path);

    private byte[] Guest(ulong at, int length)
    {
        var b = new byte[length];
        _memory.Read(new GuestAddress(at), b);
        return b;
    }

    [Fact]
    public void Config_AndFeatures()
    {
        Start();
        Assert.Equal(VirtioDeviceType.Block, _blk.DeviceType);
        ulong f = _blk.DeviceFeatures;
        Assert.NotEqual(0UL, f & VirtioFeatures.VERSION_1);
        Assert.NotEqual(0UL, f & VirtioFeatures.RING_EVENT_IDX);
        Assert.NotEqual(0UL, f & VirtioBlockFeatures.FLUSH);
        Assert.NotEqual(0UL, f & VirtioBlockFeatures.DISCARD);
        Assert.NotEqual(0UL, f & VirtioBlockFeatures.WRITE_ZEROES);
        Assert.Equal(0UL, f & VirtioBlockFeatures.RO);

        var config = new byte[64];
        _blk.ReadConfig(0, config);
        Assert.Equal(DiskSize / 512, BinaryPrimitives.ReadUInt64LittleEndian(config));
        Assert.Equal(14u, BinaryPrimitives.ReadUInt32LittleEndian(config.AsSpan(12))); // seg_max
        Assert.Equal(512u, BinaryPrimitives.ReadUInt32LittleEndian(config.AsSpan(20))); // blk_size
        Assert.Equal(1, BinaryPrimitives.ReadUInt16LittleEndian(config.AsSpan(34)));    // num_queues
        Assert.Equal(VirtioBlock.MaxDiscardSectors, BinaryPrimitives.ReadUInt32LittleEndian(config.AsSpan(36)));
        Assert.Equal(1, config[56]);
        Assert.All(config[60..], b => Assert.Equal(0, b));

        // Partial and out-of-range reads.
        var two = new byte[2];
        _blk.ReadConfig(20, two);
        Assert.Equal(512, BinaryPrimitives.ReadUInt16LittleEndian(two));
        _blk.ReadConfig(4096, two);
        Assert.Equal(new byte[2], two);
        _blk.WriteConfig(0, new byte[8]); // read-only: ignored
        _blk.ReadConfig(0, config);
        Assert.Equal(DiskSize / 512, BinaryPrimitives.ReadUInt64LittleEndian(config));
    }

    [Fact]
    public void Read_ReturnsDiskContents()
    {
        Start();
        var (len, status) = Read(3, 1024);
        Assert.Equal(S_OK, status);
        Assert.Equal(1025u, len);
        Assert.Equal(Disk().AsSpan(3 * 512, 1024).ToArray(), Guest(Data, 1024));
        Assert.Equal(1, _irq.QueueSignals);
        Assert.Equal(1024, _blk.BytesRead);
    }

    [Fact]
    public void Write_ThenRead_RoundTrips()
    {
        Start();
        var payload = new byte[1536];
        new Random(1).NextBytes(payload);
        _memory.Write(new GuestAddress(Data), payload);
        var (len, status) = Write(10, 1536);
        Assert.Equal(S_OK, status);
        Assert.Equal(1u, len);
        Assert.Equal(payload, Disk().AsSpan(10 * 512, 1536).ToArray());

        _memory.TryZero(new GuestAddress(Data), 0x2000);
        Assert.Equal((1537u, S_OK), Read(10, 1536));
        Assert.Equal(payload, Guest(Data, 1536));
        Assert.Equal(2, _blk.Requests);
    }

    [Fact]
    public void Write_WithDataInManySegmentsAndHeaderSharingABuffer()
    {
        Start();
        var payload = new byte[1024];
        new Random(2).NextBytes(payload);
        // Header and first 100 data bytes in one descriptor, then the rest split oddly.
        Header(T_OUT, 2, Data - 16);
        _memory.Write(new GuestAddress(Data), payload);
        var (len, status) = Submit((Data - 16, 116, false), (Data + 100, 300, false), (Data + 400, 624, false), (Status, 1, true));
        Assert.Equal((1u, S_OK), (len, status));
        Assert.Equal(payload, Disk().AsSpan(1024, 1024).ToArray());

        // A read whose status shares the last data descriptor.
        _memory.TryZero(new GuestAddress(Data), 0x1000);
        Header(T_IN, 2);
        _memory.Write(new GuestAddress(Data + 1024), (byte)0xEE);
        ushort used = _driver.UsedIdx;
        _driver.AddChain((Hdr, 8, false), (Hdr + 8, 8, false), (Data, 1000, true), (Data + 1000, 25, true));
        _blk.ProcessQueue();
        Assert.Equal(1025u, _driver.Used(used).Len);
        Assert.Equal(S_OK, _memory.Read<byte>(new GuestAddress(Data + 1024)));
        Assert.Equal(payload, Guest(Data, 1024));
    }

    [Fact]
    public void BufferAcrossTwoRamRegions_UsesTheBouncePath()
    {
        Start();
        const ulong across = (1UL << 20) - 1024; // 1 KiB in region 0, 1 KiB in region 1
        var payload = new byte[2048];
        new Random(3).NextBytes(payload);
        _memory.Write(new GuestAddress(across), payload);
        Assert.Equal((1u, S_OK), Write(20, 2048, across));
        Assert.Equal(payload, Disk().AsSpan(20 * 512, 2048).ToArray());
        _memory.TryZero(new GuestAddress(across), 2048);
        Assert.Equal((2049u, S_OK), Read(20, 2048, across));
        Assert.Equal(payload, Guest(across, 2048));
    }

    [Fact]
    public void Flush_AndGetId()
    {
        Start();
        Header(T_FLUSH, 0);
        Assert.Equal((1u, S_OK), Submit((Hdr, 16, false), (Status, 1, true)));

        Header(T_GET_ID, 0);
        _memory.Write(new GuestAddress(Data), Enumerable.Repeat((byte)0xAA, 20).ToArray());
        var (len, status) = Submit((Hdr, 16, false), (Data, 20, true), (Status, 1, true));
        Assert.Equal((21u, S_OK), (len, status));
        var expected = new byte[20];
        "kvmsharp-disk0"u8.CopyTo(expected);
        Assert.Equal(expected, Guest(Data, 20));

        // A short ID buffer gets what fits.
        Header(T_GET_ID, 0);
        Assert.Equal((5u, S_OK), Submit((Hdr, 16, false), (Data + 0x100, 4, true), (Status, 1, true)));
        Assert.Equal("kvms"u8.ToArray(), Guest(Data + 0x100, 4));
    }

    [Fact]
    public void LongSerial_IsCutTo20Bytes()
    {
        _image = RawImage.Open(_path, false);
        _blk = new VirtioBlock(_image, "0123456789abcdefghijKLMNOP", queueSize: 16);
        _driver = new MockDriver(_memory, 16);
        Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures, [_driver.Queue], _irq));
        Header(T_GET_ID, 0);
        Assert.Equal((21u, S_OK), Submit((Hdr, 16, false), (Data, 20, true), (Status, 1, true)));
        Assert.Equal("0123456789abcdefghij"u8.ToArray(), Guest(Data, 20));
    }

    [Fact]
    public void ReadOnlyDisk_RefusesWrites_AndStaysIdentical()
    {
        Start(readOnly: true);
        Assert.True(_blk.ReadOnly);
        Assert.NotEqual(0UL, _blk.DeviceFeatures & VirtioBlockFeatures.RO);
        Assert.Equal(0UL, _blk.DeviceFeatures & VirtioBlockFeatures.DISCARD);
        byte[] before = Disk();
        _memory.Write(new GuestAddress(Data), new byte[512]);
        Assert.Equal((1u, S_IOERR), Write(0, 512));
        Header(T_WRITE_ZEROES, 0);
        WriteSegment(0, 0, 4, 0);
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Segs, 16, false), (Status, 1, true)));
        Header(T_DISCARD, 0);
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Segs, 16, false), (Status, 1, true)));
        Assert.Equal((513u, S_OK), Read(0, 512)); // reads still work
        Header(T_FLUSH, 0);
        Assert.Equal((1u, S_OK), Submit((Hdr, 16, false), (Status, 1, true)));
        Assert.Equal(before, Disk());
        Assert.Equal(3, _blk.IoErrors);
    }

    [Fact]
    public void ReadOnlyOption_OnAWritableImage()
    {
        _image = RawImage.Open(_path, false);
        _blk = new VirtioBlock(_image, "x", readOnly: true, queueSize: 16);
        _driver = new MockDriver(_memory, 16);
        Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures, [_driver.Queue], _irq));
        byte[] before = Disk();
        Assert.Equal((1u, S_IOERR), Write(0, 512));
        Assert.Equal(before, Disk());
    }

    [Theory]
    [InlineData(DiskSize / 512, 512u)]           // first sector past the end
    [InlineData(DiskSize / 512 - 1, 1024u)]      // straddles the end
    [InlineData(ulong.MaxValue, 512u)]
    [InlineData(ulong.MaxValue / 512 + 1, 512u)] // sector * 512 wraps to 0
    [InlineData(ulong.MaxValue / 512, 512u)]
    [InlineData(1UL << 54, 512u)]
    public void OutOfRange_IsIoErr_AndTheImageIsUnchanged(ulong sector, uint length)
    {
        Start();
        byte[] before = Disk();
        _memory.Write(new GuestAddress(Data), Enumerable.Repeat((byte)0x5A, (int)length).ToArray());
        Assert.Equal((1u, S_IOERR), Write(sector, length));
        Assert.Equal((1u, S_IOERR), Read(sector, length));
        Header(T_WRITE_ZEROES, 0);
        WriteSegment(0, sector, length / 512, 0);
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Segs, 16, false), (Status, 1, true)));
        Assert.Equal(before, Disk());
        Assert.Equal(3, _blk.IoErrors);
    }

    [Fact]
    public void LastSector_IsAddressable()
    {
        Start();
        Assert.Equal((513u, S_OK), Read(DiskSize / 512 - 1, 512));
        Assert.Equal(Disk().AsSpan((int)DiskSize - 512).ToArray(), Guest(Data, 512));
    }

    [Fact]
    public void BadFraming_IsIoErr()
    {
        Start();
        byte[] before = Disk();
        Assert.Equal((1u, S_IOERR), Read(0, 100));  // not a multiple of 512
        Assert.Equal((1u, S_IOERR), Write(0, 100));
        Header(T_IN, 0); // IN with readable data after the header
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Data, 512, false), (Status, 1, true)));
        Header(T_OUT, 0); // OUT with writable data before the status
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Data, 512, false), (Data + 512, 512, true), (Status, 1, true)));
        Header(T_FLUSH, 0);
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Data, 4, false), (Status, 1, true)));
        // A header shorter than 16 bytes.
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 8, false), (Status, 1, true)));
        Assert.Equal(before, Disk());
    }

    [Fact]
    public void UnknownType_IsUnsupp()
    {
        Start();
        foreach (uint type in new uint[] { 2, 3, 5, 10, 14, 0xFFFFFFFF })
        {
            Header(type, 0);
            Assert.Equal((1u, S_UNSUPP), Submit((Hdr, 16, false), (Status, 1, true)));
        }
        Assert.Equal(6, _blk.Unsupported);
    }

    [Fact]
    public void MissingOrReadOnlyStatus_FailsTheRequest_WithoutTouchingTheDisk()
    {
        Start();
        byte[] before = Disk();
        _memory.Write(new GuestAddress(Data), new byte[512]);
        Header(T_OUT, 0);
        // No writable byte at all: nowhere to put a status.
        ushort used = _driver.UsedIdx;
        _driver.AddChain((Hdr, 16, false), (Data, 512, false));
        _blk.ProcessQueue();
        Assert.Equal((ushort)(used + 1), _driver.UsedIdx);
        Assert.Equal(0u, _driver.Used(used).Len);
        // Status as a readable descriptor after a writable one: a malformed chain.
        Header(T_IN, 0);
        _driver.AddChain((Hdr, 16, false), (Data, 512, true), (Status, 1, false));
        _blk.ProcessQueue();
        Assert.Equal(0u, _driver.Used((ushort)(used + 1)).Len);
        Assert.Equal(before, Disk());
        Assert.Equal(2, _blk.BadChains);
        Assert.False(_blk.Broken);
        Assert.Equal((513u, S_OK), Read(0, 512)); // still serving
    }

    [Fact]
    public void DataOutsideRam_IsABadChain()
    {
        Start();
        byte[] before = Disk();
        Header(T_OUT, 0);
        ushort used = _driver.UsedIdx;
        _driver.AddChain((Hdr, 16, false), (3UL << 20, 512, false), (Status, 1, true));
        _driver.AddChain((Hdr, 16, false), ((2UL << 20) - 256, 512, false), (Status, 1, true)); // runs off the end
        _driver.AddChain((Hdr, 16, false), (ulong.MaxValue - 100, 512, false), (Status, 1, true)); // wraps
        _blk.ProcessQueue();
        Assert.Equal((ushort)(used + 3), _driver.UsedIdx);
        for (int i = 0; i < 3; i++)
            Assert.Equal(0u, _driver.Used((ushort)(used + i)).Len);
        Assert.Equal(3, _blk.BadChains);
        Assert.Equal(before, Disk());
    }

    private void WriteSegment(int index, ulong sector, uint sectors, uint flags)
    {
        ulong a = Segs + 16UL * (ulong)index;
        _memory.Write(new GuestAddress(a), sector);
        _memory.Write(new GuestAddress(a + 8), sectors);
        _memory.Write(new GuestAddress(a + 12), flags);
    }

    [Fact]
    public void WriteZeroes_AndDiscard_ZeroTheRanges()
    {
        Start();
        byte[] expected = Disk();
        Header(T_WRITE_ZEROES, 0);
        WriteSegment(0, 4, 2, 0);
        WriteSegment(1, 100, 1, 1); // with UNMAP
        Assert.Equal((1u, S_OK), Submit((Hdr, 16, false), (Segs, 32, false), (Status, 1, true)));
        Array.Clear(expected, 4 * 512, 1024);
        Array.Clear(expected, 100 * 512, 512);
        Assert.Equal(expected, Disk());

        Header(T_DISCARD, 0);
        WriteSegment(0, 7, 3, 0);
        Assert.Equal((1u, S_OK), Submit((Hdr, 16, false), (Segs, 16, false), (Status, 1, true)));
        Array.Clear(expected, 7 * 512, 1536);
        Assert.Equal(expected, Disk());
    }

    [Fact]
    public void DiscardSegments_AreValidatedBeforeAnyIsApplied()
    {
        Start();
        byte[] before = Disk();
        Header(T_DISCARD, 0);
        WriteSegment(0, 1, 1, 0);
        WriteSegment(1, 1, 1, 1); // unmap on a discard
        Assert.Equal((1u, S_UNSUPP), Submit((Hdr, 16, false), (Segs, 32, false), (Status, 1, true)));
        Header(T_WRITE_ZEROES, 0);
        WriteSegment(1, 1, 1, 2); // unknown flag
        Assert.Equal((1u, S_UNSUPP), Submit((Hdr, 16, false), (Segs, 32, false), (Status, 1, true)));
        WriteSegment(1, DiskSize / 512, 1, 0); // out of range
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Segs, 32, false), (Status, 1, true)));
        WriteSegment(1, 0, VirtioBlock.MaxDiscardSectors + 1, 0); // above max_write_zeroes_sectors
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Segs, 32, false), (Status, 1, true)));
        WriteSegment(1, ulong.MaxValue, 1, 0);
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Segs, 32, false), (Status, 1, true)));
        // Too many segments, a partial segment, none at all.
        for (int i = 0; i <= VirtioBlock.MaxDiscardSegments; i++)
            WriteSegment(i, 1, 1, 0);
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Segs, 16u * (VirtioBlock.MaxDiscardSegments + 1), false), (Status, 1, true)));
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Segs, 20, false), (Status, 1, true)));
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Status, 1, true)));
        Assert.Equal(before, Disk());
    }

    [Fact]
    public void BackendFailure_IsIoErr()
    {
        using var failing = new FailingDisk();
        _blk = new VirtioBlock(failing, "f", queueSize: 16);
        _driver = new MockDriver(_memory, 16);
        Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures, [_driver.Queue], _irq));
        Assert.Equal(S_IOERR, Read(0, 512).Status);
        Assert.Equal(S_IOERR, Write(0, 512).Status);
        Header(T_FLUSH, 0);
        Assert.Equal(S_IOERR, Submit((Hdr, 16, false), (Status, 1, true)).Status);
        Header(T_WRITE_ZEROES, 0);
        WriteSegment(0, 0, 1, 0);
        Assert.Equal(S_IOERR, Submit((Hdr, 16, false), (Segs, 16, false), (Status, 1, true)).Status);
        Header(T_DISCARD, 0);
        Assert.Equal(S_IOERR, Submit((Hdr, 16, false), (Segs, 16, false), (Status, 1, true)).Status);
    }

    [Fact]
    public void WithoutFlushNegotiated_WritesAreFlushed()
    {
        using var disk = new FailingDisk { FailOnlyFlush = true };
        _blk = new VirtioBlock(disk, "f", queueSize: 16);
        _driver = new MockDriver(_memory, 16);
        Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures & ~VirtioBlockFeatures.FLUSH, [_driver.Queue], _irq));
        Assert.Equal(S_IOERR, Write(0, 512).Status); // the write-through flush failed
        Assert.Equal(1, disk.Writes);
        _blk.Reset();
        _memory.TryZero(new GuestAddress(MockDriver.DescAddr), 0x4000); // fresh rings
        _driver = new MockDriver(_memory, 16);
        Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures, [_driver.Queue], _irq));
        Assert.Equal(S_OK, Write(0, 512).Status); // write-back: no flush per write
    }

    [Fact]
    public void EventIdx_SuppressesInterruptsUntilUsedEvent()
    {
        Start();
        _driver.Queue.EventIndex = true;
        _driver.SetUsedEvent(1);
        Read(0, 512);
        Assert.Equal(1, _irq.QueueSignals); // first one always signals
        Read(0, 512);                       // used.idx 1 -> 2 passes used_event 1
        Assert.Equal(2, _irq.QueueSignals);
        Read(0, 512);                       // 2 -> 3, used_event still 1
        Assert.Equal(2, _irq.QueueSignals);
        Assert.Equal(3, _driver.AvailEvent);
    }

    [Fact]
    public void NotifyBeforeActivationOrAfterReset_IsIgnored()
    {
        _image = RawImage.Open(_path, false);
        _blk = new VirtioBlock(_image, "x", queueSize: 16);
        _driver = new MockDriver(_memory, 16);
        Header(T_IN, 0);
        _driver.AddChain((Hdr, 16, false), (Data, 512, true), (Status, 1, true));
        _blk.QueueNotify(0); _blk.WaitIdle();
        Assert.Equal(0, _driver.UsedIdx);
        Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures, [_driver.Queue], _irq));
        _blk.Reset();
        _blk.QueueNotify(0); _blk.WaitIdle();
        Assert.Equal(0, _driver.UsedIdx);
        Assert.False(_blk.Activate(_memory, _blk.DeviceFeatures, [new VirtQueue(16)], _irq)); // not ready
    }

    [Fact]
    public void MultiQueue_ServesEachReadyQueue_AndIgnoresUnusedOnes()
    {
        _image = RawImage.Open(_path, false);
        _blk = new VirtioBlock(_image, "mq", readOnly: false, queueSize: 16, numQueues: 3);
        Assert.Equal(3, _blk.QueueCount);
        Assert.NotEqual(0UL, _blk.DeviceFeatures & VirtioBlockFeatures.MQ);
        var config = new byte[2];
        _blk.ReadConfig(34, config);
        Assert.Equal(3, BinaryPrimitives.ReadUInt16LittleEndian(config));
        var mq = new MultiQueueDriver(_memory, 3, 16);
        mq.Queues[2].Ready = false; // the driver uses two of the three
        Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures, mq.Queues, _irq));

        Header(T_IN, 5);
        mq.AddChain(1, (Hdr, 16, false), (Data, 512, true), (Status, 1, true));
        _blk.QueueNotify(0); _blk.WaitIdle(); // nothing on queue 0
        Assert.Equal(0, mq.UsedIdx(1));
        _blk.QueueNotify(1); _blk.WaitIdle();
        Assert.Equal(1, mq.UsedIdx(1));
        Assert.Equal(513u, mq.Used(1, 0).Len);
        Assert.Equal(1, _irq.LastQueue);
        Assert.Equal(Disk().AsSpan(5 * 512, 512).ToArray(), Guest(Data, 512));
        _blk.QueueNotify(2); _blk.WaitIdle();
        _blk.QueueNotify(3); _blk.WaitIdle();
        _blk.QueueNotify(-1); _blk.WaitIdle();
        Assert.Equal(1, _blk.Requests);
        Assert.Throws<ArgumentOutOfRangeException>(() => new VirtioBlock(_image, "x", false, 16, 0));
        Assert.Equal(0UL, new VirtioBlock(_image, "x").DeviceFeatures & VirtioBlockFeatures.MQ);
    }

    [Fact]
    public void Qcow2Backend_RoundTrips_AndPersists()
    {
        string qcow = _path + ".qcow2";
        try
        {
            Qcow2Creator.Create(qcow, new Qcow2CreateOptions { Size = 1UL << 20 });
            var payload = new byte[4096];
            new Random(9).NextBytes(payload);
            using (IBlockDevice disk = BlockDeviceFactory.Open(qcow, readOnly: false))
            {
                _blk = new VirtioBlock(disk, "q", queueSize: 16);
                _driver = new MockDriver(_memory, 16);
                Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures, [_driver.Queue], _irq));
                Assert.Equal(2048UL, _blk.CapacitySectors);
                _memory.Write(new GuestAddress(Data), payload);
                Assert.Equal((1u, S_OK), Write(300, 4096));
                Assert.Equal((1u, S_OK), Write(1000, 4096));
                Header(T_WRITE_ZEROES, 0);
                WriteSegment(0, 1000, 4, 0);
                Assert.Equal((1u, S_OK), Submit((Hdr, 16, false), (Segs, 16, false), (Status, 1, true)));
                Header(T_DISCARD, 0);
                WriteSegment(0, 1004, 4, 0);
                Assert.Equal((1u, S_OK), Submit((Hdr, 16, false), (Segs, 16, false), (Status, 1, true)));
                Header(T_FLUSH, 0);
                Assert.Equal((1u, S_OK), Submit((Hdr, 16, false), (Status, 1, true)));
                Assert.Equal((1u, S_IOERR), Write(2048, 512)); // past the virtual size
                _blk.Reset();
            }
            using (IBlockDevice disk = BlockDeviceFactory.Open(qcow, readOnly: true))
            {
                _memory.TryZero(new GuestAddress(MockDriver.DescAddr), 0x4000);
                _blk = new VirtioBlock(disk, "q", queueSize: 16);
                _driver = new MockDriver(_memory, 16);
                Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures, [_driver.Queue], _irq));
                _memory.TryZero(new GuestAddress(Data), 0x2000);
                Assert.Equal((4097u, S_OK), Read(300, 4096));
                Assert.Equal(payload, Guest(Data, 4096));
                _memory.Write(new GuestAddress(Data), payload);
                Assert.Equal((4097u, S_OK), Read(1000, 4096));
                Assert.Equal(new byte[4096], Guest(Data, 4096));
                Assert.Equal((1u, S_IOERR), Write(0, 512)); // read-only
            }
        }
        finally
        {
            File.Delete(qcow);
        }
    }

    [Fact]
    public void ThroughTheMmioTransport()
    {
        _image = RawImage.Open(_path, false);
        _blk = new VirtioBlock(_image, "kvmsharp-disk0", queueSize: 16);
        var line = new CountingLine();
        var mmio = TestTransports.Mmio(_blk, _memory, line);
        var b = new byte[8];
        mmio.Read(0x100, b); // config: capacity
        Assert.Equal(DiskSize / 512, BinaryPrimitives.ReadUInt64LittleEndian(b));
        var w = new byte[4];
        mmio.Read(0x8, w);
        Assert.Equal(2u, BinaryPrimitives.ReadUInt32LittleEndian(w));
    }

    [Fact]
    public void Requests_AllocateNothing()
    {
        Start();
        Read(0, 4096);
        Write(8, 4096);
        const ulong across = (1UL << 20) - 1024;
        Write(16, 2048, across);
        for (int round = 0; round < 2; round++) // the first round warms up the JIT
        {
            Header(T_IN, 1);
            Header(T_OUT, 2, Hdr + 0x100);
            Header(T_FLUSH, 0, Hdr + 0x200);
            Header(T_IN, 3, Hdr + 0x300);
            _driver.AddChain((Hdr, 16, false), (Data, 4096, true), (Status, 1, true));
            _driver.AddChain((Hdr + 0x100, 16, false), (Data, 4096, false), (Status, 1, true));
            _driver.AddChain((Hdr + 0x200, 16, false), (Status, 1, true));
            _driver.AddChain((Hdr + 0x300, 16, false), (across, 2048, true), (Status, 1, true));
            long before = GC.GetAllocatedBytesForCurrentThread();
            _blk.ProcessQueue();
            long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            if (round == 1)
                Assert.Equal(0, allocated);
        }
        Assert.Equal(0, _blk.IoErrors);
    }

    /// <summary>Seeded random chains and headers: the device never throws, always returns the
    /// chain, and only writes the disk inside its capacity.</summary>
    [Fact]
    public void Fuzz_RandomChains_NeverThrow()
    {
        Start();
        var rng = new Random(12345);
        uint[] types = [T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 2, 0xFFFFFFFF];
        ulong[] sectors = [0, 1, DiskSize / 512 - 1, DiskSize / 512, ulong.MaxValue, ulong.MaxValue / 512 + 1, 1UL << 40];
        for (int iter = 0; iter < 3000; iter++)
        {
            // Random header and segment bytes.
            Header(types[rng.Next(types.Length)], rng.Next(4) == 0 ? (ulong)rng.NextInt64() : sectors[rng.Next(sectors.Length)]);
            if (rng.Next(3) == 0)
            {
                var junk = new byte[16];
                rng.NextBytes(junk);
                _memory.Write(new GuestAddress(Hdr), junk);
            }
            for (int i = 0; i < 9; i++)
                WriteSegment(i, sectors[rng.Next(sectors.Length)] + (ulong)rng.Next(3), (uint)rng.Next(-1, 200), (uint)rng.Next(4) == 0 ? (uint)rng.Next() : 0);

            if (rng.Next(2) == 0)
            {
                // Structure-aware: a well-framed request with random fields.
                uint type = _memory.Read<uint>(new GuestAddress(Hdr));
                uint length = 512u * (uint)rng.Next(0, 9);
                bool inward = type is T_IN or T_GET_ID;
                var chain = new List<(ulong, uint, bool)> { (Hdr, 16, false) };
                if (type is T_DISCARD or T_WRITE_ZEROES)
                    chain.Add((Segs, 16u * (uint)rng.Next(1, 10), false));
                else if (length != 0 && type != T_FLUSH)
                    chain.Add((Data + (ulong)rng.Next(0, 0x100), length, inward));
                chain.Add((Status, 1, true));
                ushort before = _driver.UsedIdx;
                _driver.AddChain([.. chain]);
                _blk.ProcessQueue();
                Assert.Equal((ushort)(before + 1), _driver.UsedIdx);
                Assert.True(_driver.Used(before).Len >= 1);
                continue;
            }

            int n = rng.Next(1, 6);
            var buffers = new (ulong, uint, bool)[n];
            bool seenWrite = false;
            for (int i = 0; i < n; i++)
            {
                ulong addr = rng.Next(10) switch
                {
                    0 => (ulong)rng.NextInt64(),
                    1 => (2UL << 20) - (ulong)rng.Next(1, 2048),
                    2 => (1UL << 20) - (ulong)rng.Next(1, 2048),
                    _ => i == 0 ? Hdr : Data + (ulong)rng.Next(0, 0x8000),
                };
                uint len = rng.Next(5) switch
                {
                    0 => (uint)rng.Next(0, 20),
                    1 => 16,
                    2 => 512u * (uint)rng.Next(1, 8),
                    3 => (uint)rng.Next(),
                    _ => (uint)rng.Next(1, 4096),
                };
                bool write = rng.Next(4) == 0 ? !seenWrite : seenWrite || rng.Next(2) == 0;
                seenWrite |= write;
                buffers[i] = (addr, len, write);
            }
            ushort used = _driver.UsedIdx;
            _driver.AddChain(buffers);
            _blk.ProcessQueue();
            Assert.False(_blk.Broken);
            Assert.Equal((ushort)(used + 1), _driver.UsedIdx);
        }
        Assert.Equal((long)DiskSize, new FileInfo(_path).Length); // never grown
        Assert.Equal(3000, _blk.Requests + _blk.BadChains);
        Assert.True(_blk.Requests > 300, $"only {_blk.Requests} requests reached the device");
        Assert.True(_blk.Requests - _blk.IoErrors - _blk.Unsupported > 200, $"only {_blk.Requests - _blk.IoErrors - _blk.Unsupported} succeeded");
    }

    [Fact]
    public void SlowDisk_BlocksOnlyTheWorker_AndResetWaitsForTheRequestInFlight()
    {
        using var disk = new GateDisk();
        _blk = new VirtioBlock(disk, "slow", queueSize: 16);
        _driver = new MockDriver(_memory, 16);
        Assert.True(_blk.Activate(_memory, _blk.DeviceFeatures, [_driver.Queue], _irq));
        _memory.Write(new GuestAddress(Status), (byte)0xEE);
        Header(T_FLUSH, 0);
        _driver.AddChain((Hdr, 16, false), (Status, 1, true));

        var notify = System.Diagnostics.Stopwatch.StartNew();
        _blk.QueueNotify(0); // the I/O thread's call: returns while the fsync hangs
        Assert.True(notify.ElapsedMilliseconds < 1000);
        Assert.True(disk.FlushEntered.Wait(TimeSpan.FromSeconds(10), TestContext.Current.CancellationToken));

        var reset = new Thread(() => _blk.Reset()) { IsBackground = true };
        reset.Start();
        Assert.False(reset.Join(200)); // the request in flight still owns guest memory
        disk.Release.Set();
        Assert.True(reset.Join(TimeSpan.FromSeconds(10)));
        Assert.Equal((ushort)1, _driver.UsedIdx);
        Assert.Equal(S_OK, _memory.Read<byte>(new GuestAddress(Status)));

        // After Reset the worker touches nothing.
        _driver.AddChain((Hdr, 16, false), (Status, 1, true));
        _blk.QueueNotify(0);
        _blk.WaitIdle();
        Assert.Equal((ushort)1, _driver.UsedIdx);
    }

    /// <summary>A disk whose Flush waits for the test.</summary>
    private sealed class GateDisk : IBlockDevice
    {
        public ManualResetEventSlim FlushEntered { get; } = new();

        public ManualResetEventSlim Release { get; } = new();

        public ulong Size => 1 << 20;

        public bool ReadOnly => false;

        public int Read(Span<byte> buffer, ulong offset)
        {
            buffer.Clear();
            return buffer.Length;
        }

        public void Write(ReadOnlySpan<byte> data, ulong offset)
        {
        }

        public void Flush()
        {
            FlushEntered.Set();
            Release.Wait(TimeSpan.FromSeconds(30));
        }

        public void Discard(ulong offset, ulong length)
        {
        }

        public void WriteZeroes(ulong offset, ulong length)
        {
        }

        public void Dispose()
        {
            Release.Set();
            FlushEntered.Dispose();
            Release.Dispose();
        }
    }

    private sealed class FailingDisk : IBlockDevice
    {
        public bool FailOnlyFlush { get; init; }

        public int Writes { get; private set; }

        public ulong Size => 1 << 20;

        public bool ReadOnly => false;

        public int Read(Span<byte> buffer, ulong offset) =>
            FailOnlyFlush ? buffer.Length : throw new ImageException(ImageErrorKind.Io, "fake", "read failed");

        public void Write(ReadOnlySpan<byte> data, ulong offset)
        {
            Writes++;
            if (!FailOnlyFlush)
                throw new IOException("disk on fire");
        }

        public void Flush() => throw new IOException("fsync failed");

        public void Discard(ulong offset, ulong length) => throw new ImageException(ImageErrorKind.Corrupt, "fake", "bad table");

        public void WriteZeroes(ulong offset, ulong length) => throw new ObjectDisposedException("fake");

        public void Dispose()
        {
        }
    }
}
