using System.Buffers.Binary;
using KvmSharp.Devices.Virtio;
using KvmSharp.Images;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

/// <summary>
/// Hostile queues at the level a guest reaches them: a real device behind virtio-mmio, driven
/// through its registers and guest memory (style.md §5, §7). Every case must end with the request
/// failed (returned with length 0, nothing written) or the device stopped with DEVICE_NEEDS_RESET
/// (virtio 1.2 §2.1.2); never an exception, a hang or an access outside guest memory.
/// Zero-length descriptors are the one lenient case, as in virtio-queue: they are skipped without
/// being dereferenced, so a request fails only when what remains lacks a buffer it needs.
/// </summary>
public sealed class HostileQueueTests : IDisposable
{
    // virtio-mmio registers (virtio 1.2 §4.2.2).
    private const ulong DriverFeatures = 0x20, DriverFeaturesSel = 0x24, QueueSel = 0x30, QueueNum = 0x38,
        QueueReady = 0x44, QueueNotify = 0x50, InterruptStatus = 0x60, InterruptAck = 0x64, StatusReg = 0x70,
        QueueDescLow = 0x80, QueueDriverLow = 0x90, QueueDeviceLow = 0xa0;
    private const uint DriverOkStatus = 15; // ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    private const uint IntConfig = 2;

    private const ulong Features = VirtioFeatures.VERSION_1 | VirtioFeatures.RING_INDIRECT_DESC;
    private const ulong RamSize = 1UL << 20;
    private const ulong Table = 0x8000; // an indirect table
    private const ulong Data = MockDriver.DataAddr;
    private const ushort F_NEXT = MockDriver.F_NEXT, F_WRITE = MockDriver.F_WRITE, F_INDIRECT = MockDriver.F_INDIRECT;

    private readonly List<IDisposable> _owned = [];

    public void Dispose()
    {
        foreach (IDisposable d in _owned)
            d.Dispose();
    }

    private GuestMemory Ram(ulong size)
    {
        GuestMemory memory = GuestMemory.CreateForTesting([(new GuestAddress(0), size)]);
        _owned.Add(memory);
        return memory;
    }

    private static void W(VirtioMmioTransport mmio, ulong offset, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        mmio.Write(offset, b);
    }

    private static uint R(VirtioMmioTransport mmio, ulong offset)
    {
        Span<byte> b = stackalloc byte[4];
        mmio.Read(offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    /// <summary>Linux's virtio_mmio probe order (§3.1.1), queue 0 at the mock driver's rings.</summary>
    private static void BringUp(VirtioMmioTransport mmio, MockDriver d, ulong features = Features)
    {
        W(mmio, StatusReg, 0);
        W(mmio, StatusReg, 1);
        W(mmio, StatusReg, 3);
        W(mmio, DriverFeaturesSel, 0);
        W(mmio, DriverFeatures, (uint)features);
        W(mmio, DriverFeaturesSel, 1);
        W(mmio, DriverFeatures, (uint)(features >> 32));
        W(mmio, StatusReg, 11);
        W(mmio, QueueSel, 0);
        W(mmio, QueueNum, d.Size);
        W(mmio, QueueDescLow, (uint)MockDriver.DescAddr);
        W(mmio, QueueDriverLow, (uint)MockDriver.AvailAddr);
        W(mmio, QueueDeviceLow, (uint)MockDriver.UsedAddr);
        W(mmio, QueueReady, 1);
        W(mmio, StatusReg, DriverOkStatus);
        Assert.Equal(DriverOkStatus, R(mmio, StatusReg));
    }

    private (VirtioRng Rng, VirtioMmioTransport Mmio, MockDriver Driver, GuestMemory Memory) StartRng(ulong ram = RamSize, ushort queueSize = 16)
    {
        GuestMemory memory = Ram(ram);
        var rng = new VirtioRng(queueSize);
        var mmio = TestTransports.Mmio(rng, memory, new CountingLine());
        var driver = new MockDriver(memory, queueSize);
        BringUp(mmio, driver);
        return (rng, mmio, driver, memory);
    }

    private static byte[] Snapshot(GuestMemory memory, ulong at, int length)
    {
        var b = new byte[length];
        memory.Read(new GuestAddress(at), b);
        return b;
    }

    private static void Fill(GuestMemory memory, ulong at, int length, byte value)
    {
        var b = new byte[length];
        Array.Fill(b, value);
        memory.Write(new GuestAddress(at), b);
    }

    // ---------------------------------------------------------------- malformed chains (request failed)

    public static TheoryData<string> MalformedChains =>
    [
        "descriptor loop",
        "descriptor loop through every descriptor",
        "descriptor loop inside an indirect table",
        "next index past the table",
        "buffer running past the end of RAM",
        "buffer starting past the end of RAM",
        "addr + len wrapping 64 bits",
        "zero-length descriptor with next past the table",
        "readable after writable",
        "indirect table inside an indirect table",
        "indirect with NEXT",
        "indirect table length not a multiple of 16",
        "empty indirect table",
        "indirect table running past the end of RAM",
        "indirect table addr + len wrapping 64 bits",
        "indirect next past the indirect table",
    ];

    /// <summary>
    /// Each malformed chain reaches virtio-rng through the transport's notify register. The chain
    /// comes back with length 0 and is counted, the guest buffers it names stay untouched, and the
    /// device keeps serving (a malformed chain is the driver's bug, not an impossible ring).
    /// </summary>
    [Theory]
    [MemberData(nameof(MalformedChains))]
    public void Rng_MalformedChain_IsReturnedEmpty_NothingWritten_DeviceKeepsServing(string kind)
    {
        var (rng, mmio, d, memory) = StartRng();
        Fill(memory, Data, 0x1000, 0xAA);
        Fill(memory, RamSize - 0x100, 0x100, 0xAA);
        const ulong desc = MockDriver.DescAddr;
        switch (kind)
        {
            case "descriptor loop":
                d.WriteDesc(desc, 3, Data, 8, (ushort)(F_WRITE | F_NEXT), 4);
                d.WriteDesc(desc, 4, Data + 8, 8, (ushort)(F_WRITE | F_NEXT), 3);
                break;
            case "descriptor loop through every descriptor":
                for (ushort i = 0; i < 16; i++)
                    d.WriteDesc(desc, i, Data + 8UL * i, 8, (ushort)(F_WRITE | F_NEXT), (ushort)((i + 1) % 16));
                break;
            case "descriptor loop inside an indirect table":
                d.WriteDesc(Table, 0, Data, 8, (ushort)(F_WRITE | F_NEXT), 1);
                d.WriteDesc(Table, 1, Data + 8, 8, (ushort)(F_WRITE | F_NEXT), 0);
                d.WriteDesc(desc, 3, Table, 32, F_INDIRECT, 0);
                break;
            case "next index past the table":
                d.WriteDesc(desc, 3, Data, 8, (ushort)(F_WRITE | F_NEXT), 16);
                break;
            case "buffer running past the end of RAM":
                d.WriteDesc(desc, 3, Data, 8, (ushort)(F_WRITE | F_NEXT), 4);
                d.WriteDesc(desc, 4, RamSize - 0x10, 0x20, F_WRITE, 0);
                break;
            case "buffer starting past the end of RAM":
                d.WriteDesc(desc, 3, Data, 8, (ushort)(F_WRITE | F_NEXT), 4);
                d.WriteDesc(desc, 4, 0x7000_0000, 0x20, F_WRITE, 0);
                break;
            case "addr + len wrapping 64 bits":
                // ulong.MaxValue - 7 + 0x20 wraps to 0x18: a sum without overflow checks lands in RAM.
                d.WriteDesc(desc, 3, Data, 8, (ushort)(F_WRITE | F_NEXT), 4);
                d.WriteDesc(desc, 4, ulong.MaxValue - 7, 0x20, F_WRITE, 0);
                break;
            case "zero-length descriptor with next past the table":
                d.WriteDesc(desc, 3, Data, 8, (ushort)(F_WRITE | F_NEXT), 4);
                d.WriteDesc(desc, 4, Data + 8, 0, (ushort)(F_WRITE | F_NEXT), 0xFFFF);
                break;
            case "readable after writable":
                d.WriteDesc(desc, 3, Data, 8, (ushort)(F_WRITE | F_NEXT), 4);
                d.WriteDesc(desc, 4, Data + 8, 8, F_NEXT, 5);
                d.WriteDesc(desc, 5, Data + 16, 8, F_WRITE, 0);
                break;
            case "indirect table inside an indirect table":
                d.WriteDesc(Table + 0x100, 0, Data, 8, F_WRITE, 0);
                d.WriteDesc(Table, 0, Table + 0x100, 16, F_INDIRECT, 0);
                d.WriteDesc(desc, 3, Table, 16, F_INDIRECT, 0);
                break;
            case "indirect with NEXT":
                d.WriteDesc(Table, 0, Data, 8, F_WRITE, 0);
                d.WriteDesc(desc, 3, Table, 16, (ushort)(F_INDIRECT | F_NEXT), 4);
                d.WriteDesc(desc, 4, Data + 8, 8, F_WRITE, 0);
                break;
            case "indirect table length not a multiple of 16":
                d.WriteDesc(Table, 0, Data, 8, F_WRITE, 0);
                d.WriteDesc(Table, 1, Data + 8, 8, F_WRITE, 0);
                d.WriteDesc(desc, 3, Table, 24, F_INDIRECT, 0);
                break;
            case "empty indirect table":
                d.WriteDesc(desc, 3, Table, 0, F_INDIRECT, 0);
                break;
            case "indirect table running past the end of RAM":
                d.WriteDesc(desc, 3, RamSize - 16, 32, F_INDIRECT, 0);
                break;
            case "indirect table addr + len wrapping 64 bits":
                d.WriteDesc(desc, 3, ulong.MaxValue - 15, 32, F_INDIRECT, 0);
                break;
            case "indirect next past the indirect table":
                d.WriteDesc(Table, 0, Data, 8, (ushort)(F_WRITE | F_NEXT), 2);
                d.WriteDesc(desc, 3, Table, 32, F_INDIRECT, 0);
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(kind));
        }
        d.Publish(3);
        W(mmio, QueueNotify, 0);

        Assert.Equal(1, d.UsedIdx);
        Assert.Equal((3u, 0u), d.Used(0));
        Assert.Equal(1, rng.BadChains);
        Assert.Equal(0, rng.BytesServed);
        Assert.All(Snapshot(memory, Data, 0x1000), b => Assert.Equal(0xAA, b));
        Assert.All(Snapshot(memory, RamSize - 0x100, 0x100), b => Assert.Equal(0xAA, b));
        Assert.False(rng.Broken);
        Assert.Equal(DriverOkStatus, R(mmio, StatusReg));

        // Still serving.
        ushort head = d.AddChain((Data + 0x2000, 8, true));
        W(mmio, QueueNotify, 0);
        Assert.Equal(((uint)head, 8u), d.Used(1));
    }

    /// <summary>Zero-length descriptors are skipped, never dereferenced: here one sits at an
    /// address that is not RAM and one at the very top of the address space. A request made only
    /// of them has no room for random bytes and comes back with length 0.</summary>
    [Fact]
    public void Rng_ZeroLengthDescriptors_AreNeverDereferenced_RequestGetsNothing()
    {
        var (rng, mmio, d, _) = StartRng();
        ushort head = d.AddChain((0x7000_0000, 0, true), (ulong.MaxValue, 0, true), (Data, 0, true));
        W(mmio, QueueNotify, 0);
        Assert.Equal(((uint)head, 0u), d.Used(0));
        Assert.Equal(0, rng.BytesServed);
        Assert.False(rng.Broken);

        // Between real buffers they change nothing: 8 + 8 bytes are filled.
        head = d.AddChain((Data, 8, true), (ulong.MaxValue, 0, true), (Data + 0x100, 8, true));
        W(mmio, QueueNotify, 0);
        Assert.Equal(((uint)head, 16u), d.Used(1));
    }

    /// <summary>virtio-rng fills device-writable buffers only (§5.4.6): a request whose buffer
    /// the driver marked device-readable gets nothing, and the buffer is not written.</summary>
    [Fact]
    public void Rng_DeviceReadableBufferWhereWritableIsNeeded_IsNotWritten()
    {
        var (rng, mmio, d, memory) = StartRng();
        Fill(memory, Data, 64, 0xAA);
        ushort head = d.AddChain((Data, 64, false));
        W(mmio, QueueNotify, 0);
        Assert.Equal(((uint)head, 0u), d.Used(0));
        Assert.All(Snapshot(memory, Data, 64), b => Assert.Equal(0xAA, b));
        Assert.Equal(0, rng.BytesServed);
    }

    /// <summary>
    /// 32-bit total-length overflow: every buffer is inside RAM (they all name the same 15 MiB),
    /// but 274 of them add up to more than 2^32 bytes, which no chain may reach (virtio 1.2
    /// §2.7.5.2; virtio-queue chain.rs). Summed in 32 bits the total would wrap to about 11 MiB and
    /// the device would fill 64 KiB; instead the chain is returned empty.
    /// </summary>
    [Fact]
    public void Rng_ChainTotalLengthOver4GiB_IsReturnedEmpty()
    {
        const uint Piece = 15 << 20;
        const int Pieces = 274; // 274 * 15 MiB = 4.01 GiB
        var (rng, mmio, d, memory) = StartRng(ram: 16UL << 20, queueSize: 512);
        Fill(memory, 1UL << 20, 0x10000, 0xAA);
        var buffers = new (ulong, uint, bool)[Pieces];
        Array.Fill(buffers, (1UL << 20, Piece, true));
        ushort head = d.AddChain(buffers);
        W(mmio, QueueNotify, 0);
        Assert.Equal(((uint)head, 0u), d.Used(0));
        Assert.Equal(1, rng.BadChains);
        Assert.Equal(0, rng.BytesServed);
        Assert.All(Snapshot(memory, 1UL << 20, 0x10000), b => Assert.Equal(0xAA, b));
        Assert.False(rng.Broken);
    }

    // ---------------------------------------------------------------- impossible rings (DEVICE_NEEDS_RESET)

    /// <summary>
    /// An available index more than a queue size ahead of the device's cannot come from an
    /// honest driver (virtio 1.2 §2.7.6; firecracker InvalidAvailIdx). The device stops, the
    /// driver sees DEVICE_NEEDS_RESET with a configuration change interrupt (§2.1.2), further
    /// kicks do nothing, and a reset brings the device back.
    /// </summary>
    [Fact]
    public void Rng_AvailableIndexJumpingMoreThanTheQueueSize_SetsDeviceNeedsReset()
    {
        var (rng, mmio, d, memory) = StartRng();
        d.AddChain((Data, 8, true));
        W(mmio, QueueNotify, 0);
        Assert.Equal(1, d.UsedIdx);
        W(mmio, InterruptAck, R(mmio, InterruptStatus));

        d.SetAvailIdx(1 + 17); // 17 new entries in a ring of 16
        W(mmio, QueueNotify, 0);
        Assert.True(rng.Broken);
        Assert.Equal(DriverOkStatus | VirtioDeviceStatus.DEVICE_NEEDS_RESET, R(mmio, StatusReg));
        Assert.Equal(IntConfig, R(mmio, InterruptStatus) & IntConfig);
        Assert.Equal(1, d.UsedIdx);

        // A driver that writes back the status it read neither clears nor re-sets the bit.
        W(mmio, StatusReg, DriverOkStatus | VirtioDeviceStatus.DEVICE_NEEDS_RESET);
        Assert.Equal(DriverOkStatus | VirtioDeviceStatus.DEVICE_NEEDS_RESET, R(mmio, StatusReg));
        d.SetAvailIdx(2);
        W(mmio, QueueNotify, 0);
        Assert.Equal(1, d.UsedIdx); // stopped until reset

        var fresh = new MockDriver(memory, 16);
        memory.TryZero(new GuestAddress(MockDriver.AvailAddr), 0x2000);
        BringUp(mmio, fresh); // writes status 0 first: a reset
        Assert.False(rng.Broken);
        Assert.Equal(DriverOkStatus, R(mmio, StatusReg));
        ushort head = fresh.AddChain((Data, 8, true));
        W(mmio, QueueNotify, 0);
        Assert.Equal(((uint)head, 8u), fresh.Used(0));
    }

    /// <summary>The boundary: exactly a queue size of new entries is a full ring, not a broken one.</summary>
    [Fact]
    public void Rng_AvailableIndexJumpingExactlyTheQueueSize_IsAFullRing()
    {
        var (rng, mmio, d, _) = StartRng();
        for (int i = 0; i < 16; i++)
            d.AddChain((Data + 0x10UL * (ulong)i, 8, true));
        W(mmio, QueueNotify, 0);
        Assert.Equal(16, d.UsedIdx);
        Assert.False(rng.Broken);
        Assert.Equal(DriverOkStatus, R(mmio, StatusReg));
    }

    // ---------------------------------------------------------------- virtio-blk

    private sealed class MemoryDisk(ulong size) : IBlockDevice
    {
        public readonly byte[] Bytes = new byte[size];
        public int Writes;

        public ulong Size => (ulong)Bytes.Length;
        public bool ReadOnly => false;
        public int Read(Span<byte> buffer, ulong offset)
        {
            Bytes.AsSpan((int)offset, buffer.Length).CopyTo(buffer);
            return buffer.Length;
        }
        public void Write(ReadOnlySpan<byte> data, ulong offset)
        {
            Writes++;
            data.CopyTo(Bytes.AsSpan((int)offset));
        }
        public void Flush()
        {
        }
        public void Discard(ulong offset, ulong length) => Writes++;
        public void WriteZeroes(ulong offset, ulong length) => Writes++;
        public void Dispose()
        {
        }
    }

    private const ulong Hdr = 0x9000, Status = 0x9100;
    private const uint T_IN = 0, T_OUT = 1;
    private const byte S_IOERR = 1;

    private (VirtioBlock Blk, VirtioMmioTransport Mmio, MockDriver Driver, GuestMemory Memory, MemoryDisk Disk) StartBlock(ulong ram = RamSize, ushort queueSize = 16)
    {
        GuestMemory memory = Ram(ram);
        var disk = new MemoryDisk(1UL << 20);
        for (int i = 0; i < disk.Bytes.Length; i++)
            disk.Bytes[i] = (byte)(i * 7);
        var blk = new VirtioBlock(disk, "hostile", queueSize: queueSize);
        var mmio = TestTransports.Mmio(blk, memory, new CountingLine());
        var driver = new MockDriver(memory, queueSize);
        BringUp(mmio, driver);
        return (blk, mmio, driver, memory, disk);
    }

    private static void Header(GuestMemory memory, uint type, ulong sector)
    {
        memory.Write(new GuestAddress(Hdr), type);
        memory.Write(new GuestAddress(Hdr + 4), 0u);
        memory.Write(new GuestAddress(Hdr + 8), sector);
    }

    /// <summary>The 32-bit total-length overflow on the device that multiplies lengths into disk
    /// offsets: a read and a write whose data buffers add up to more than 2^32 bytes are returned
    /// with length 0 and no status; neither the disk nor guest memory is touched.</summary>
    [Theory]
    [InlineData(T_IN)]
    [InlineData(T_OUT)]
    public void Block_ChainTotalLengthOver4GiB_FailsWithoutTouchingDiskOrMemory(uint type)
    {
        const uint Piece = 15 << 20;
        const int Pieces = 274;
        var (blk, mmio, d, memory, disk) = StartBlock(ram: 16UL << 20, queueSize: 512);
        byte[] before = (byte[])disk.Bytes.Clone();
        Fill(memory, 1UL << 20, 0x10000, 0xAA);
        Header(memory, type, 0);
        memory.Write(new GuestAddress(Status), (byte)0xEE);
        var buffers = new (ulong, uint, bool)[Pieces + 2];
        buffers[0] = (Hdr, 16, false);
        for (int i = 1; i <= Pieces; i++)
            buffers[i] = (1UL << 20, Piece, type == T_IN);
        buffers[^1] = (Status, 1, true);
        ushort head = d.AddChain(buffers);
        W(mmio, QueueNotify, 0);
        Assert.Equal(((uint)head, 0u), d.Used(0));
        Assert.Equal(1, blk.BadChains);
        Assert.Equal(0xEE, memory.Read<byte>(new GuestAddress(Status)));
        Assert.All(Snapshot(memory, 1UL << 20, 0x10000), b => Assert.Equal(0xAA, b));
        Assert.Equal(before, disk.Bytes);
        Assert.Equal(0, disk.Writes);
        Assert.False(blk.Broken);
    }

    /// <summary>Direction mix-ups a block driver could make (§5.2.6): the header in a
    /// device-writable buffer, the read target device-readable, the write source device-writable,
    /// the status device-readable, readable data after the writable status. Each fails: IOERR
    /// when there is a writable last byte to carry it, otherwise length 0 with nothing written.</summary>
    [Fact]
    public void Block_ReadableWritableMixUps_FailTheRequest()
    {
        var (blk, mmio, d, memory, disk) = StartBlock();
        byte[] before = (byte[])disk.Bytes.Clone();
        Fill(memory, Data, 0x1000, 0xAA);

        (uint Len, byte Status) Submit(params (ulong, uint, bool)[] buffers)
        {
            memory.Write(new GuestAddress(Status), (byte)0xEE);
            ushort used = d.UsedIdx;
            ushort head = d.AddChain(buffers);
            W(mmio, QueueNotify, 0);
            Assert.Equal((ushort)(used + 1), d.UsedIdx);
            Assert.Equal((uint)head, d.Used(used).Id);
            return (d.Used(used).Len, memory.Read<byte>(new GuestAddress(Status)));
        }

        Header(memory, T_IN, 0);
        // Header device-writable: the device finds no request header to read.
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, true), (Status, 1, true)));
        // IN whose target buffer is device-readable: the device must not write it.
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Data, 512, false), (Status, 1, true)));
        // Status device-readable after a writable data buffer: readable after writable.
        Assert.Equal((0u, (byte)0xEE), Submit((Hdr, 16, false), (Data, 512, true), (Status, 1, false)));
        Header(memory, T_OUT, 0);
        // OUT whose source buffer is device-writable (before the status): nothing is written to disk.
        Assert.Equal((1u, S_IOERR), Submit((Hdr, 16, false), (Data, 512, true), (Status, 1, true)));
        // OUT with only a device-readable status: no writable byte to carry a status.
        Assert.Equal((0u, (byte)0xEE), Submit((Hdr, 16, false), (Data, 512, false), (Status, 1, false)));

        Assert.All(Snapshot(memory, Data, 0x1000), b => Assert.Equal(0xAA, b));
        Assert.Equal(before, disk.Bytes);
        Assert.Equal(0, disk.Writes);
        Assert.False(blk.Broken);
    }

    /// <summary>Zero-length descriptors in a block request: a zero-length status descriptor
    /// leaves no status byte (length 0, disk untouched), and zero-length data descriptors at
    /// addresses outside RAM are skipped without being touched.</summary>
    [Fact]
    public void Block_ZeroLengthDescriptors_FailOrAreSkipped_NeverDereferenced()
    {
        var (blk, mmio, d, memory, disk) = StartBlock();
        Header(memory, T_OUT, 0);
        memory.Write(new GuestAddress(Status), (byte)0xEE);
        ushort head = d.AddChain((Hdr, 16, false), (Data, 512, false), (Status, 0, true));
        W(mmio, QueueNotify, 0);
        Assert.Equal(((uint)head, 0u), d.Used(0));
        Assert.Equal(0xEE, memory.Read<byte>(new GuestAddress(Status)));
        Assert.Equal(0, disk.Writes);

        // An IN of 512 bytes with empty descriptors around the data, one at the top of the address space.
        Header(memory, T_IN, 1);
        head = d.AddChain((Hdr, 16, false), (ulong.MaxValue, 0, true), (Data, 512, true), (0x7000_0000, 0, true), (Status, 1, true));
        W(mmio, QueueNotify, 0);
        Assert.Equal(((uint)head, 513u), d.Used(1));
        Assert.Equal(0, memory.Read<byte>(new GuestAddress(Status)));
        Assert.Equal(disk.Bytes.AsSpan(512, 512).ToArray(), Snapshot(memory, Data, 512));
        Assert.False(blk.Broken);
    }

    [Fact]
    public void Block_AvailableIndexJumpingMoreThanTheQueueSize_SetsDeviceNeedsReset()
    {
        var (blk, mmio, d, _, disk) = StartBlock();
        d.SetAvailIdx(0x8000);
        W(mmio, QueueNotify, 0);
        Assert.True(blk.Broken);
        Assert.Equal(DriverOkStatus | VirtioDeviceStatus.DEVICE_NEEDS_RESET, R(mmio, StatusReg));
        Assert.Equal(IntConfig, R(mmio, InterruptStatus) & IntConfig);
        Assert.Equal(0, d.UsedIdx);
        Assert.Equal(0, disk.Writes);
        W(mmio, StatusReg, 0);
        Assert.Equal(0u, R(mmio, StatusReg));
        Assert.False(blk.Broken);
    }

    /// <summary>The multi-queue devices stop on an impossible ring in any of their queues and
    /// say so with a configuration change interrupt, for the transport to show DEVICE_NEEDS_RESET
    /// (§2.1.2): virtio-net's transmitq, virtio-console's transmitq0, virtio-balloon's inflateq.</summary>
    [Theory]
    [InlineData("net", VirtioNet.TxQueueIndex)]
    [InlineData("console", 1)]
    [InlineData("balloon", 0)]
    public void MultiQueueDevice_AvailableIndexJumpingMoreThanTheQueueSize_SetsDeviceNeedsReset(string kind, int queue)
    {
        GuestMemory memory = Ram(RamSize);
        IVirtioDevice device = kind switch
        {
            "net" => new VirtioNet(new FakeNetBackend(), [0x52, 0x54, 0, 1, 2, 3], 16),
            "console" => new VirtioConsole(Stream.Null, 16),
            _ => new VirtioBalloon(16),
        };
        var mmio = TestTransports.Mmio(device, memory, new CountingLine());
        W(mmio, StatusReg, 0);
        W(mmio, StatusReg, 1);
        W(mmio, StatusReg, 3);
        W(mmio, DriverFeaturesSel, 1);
        W(mmio, DriverFeatures, 1); // VERSION_1
        W(mmio, StatusReg, 11);
        for (uint q = 0; q < (uint)device.QueueCount; q++)
        {
            W(mmio, QueueSel, q);
            W(mmio, QueueNum, 16);
            W(mmio, QueueDescLow, 0x1000 + 0x4000 * q);
            W(mmio, QueueDriverLow, 0x2000 + 0x4000 * q);
            W(mmio, QueueDeviceLow, 0x3000 + 0x4000 * q);
            W(mmio, QueueReady, 1);
        }
        W(mmio, StatusReg, DriverOkStatus);
        Assert.Equal(DriverOkStatus, R(mmio, StatusReg));

        memory.Write(new GuestAddress(0x2000 + 0x4000 * (ulong)queue + 2), (ushort)100); // avail.idx
        W(mmio, QueueNotify, (uint)queue);
        Assert.True(device.Broken);
        Assert.Equal(DriverOkStatus | VirtioDeviceStatus.DEVICE_NEEDS_RESET, R(mmio, StatusReg));
        Assert.Equal(IntConfig, R(mmio, InterruptStatus) & IntConfig);
        Assert.Equal(0, memory.Read<ushort>(new GuestAddress(0x3000 + 0x4000 * (ulong)queue + 2)));
        W(mmio, StatusReg, 0);
        Assert.False(device.Broken);
        Assert.Equal(0u, R(mmio, StatusReg));
    }
}
