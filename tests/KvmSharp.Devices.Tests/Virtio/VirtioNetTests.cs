using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using KvmSharp.Devices.Virtio;
using KvmSharp.Interop;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

/// <summary>The driver side of one split virtqueue at given addresses (virtio-queue mock.rs).</summary>
internal sealed class NetQueueDriver
{
    public const ushort F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4;

    public readonly GuestMemory Memory;
    public readonly VirtQueue Queue;
    public readonly ushort Size;
    private readonly ulong _desc, _avail, _used;
    private ushort _availIdx;
    private ushort _nextDesc;

    public NetQueueDriver(GuestMemory memory, ulong desc, ulong avail, ulong used, ushort size = 16)
    {
        Memory = memory;
        Size = size;
        (_desc, _avail, _used) = (desc, avail, used);
        Queue = new VirtQueue(size)
        {
            DescriptorTable = new GuestAddress(desc),
            AvailableRing = new GuestAddress(avail),
            UsedRing = new GuestAddress(used),
            Ready = true,
        };
        Assert.True(Queue.IsValid(memory));
    }

    public void WriteDesc(ushort index, ulong addr, uint len, ushort flags, ushort next)
    {
        ulong a = _desc + 16UL * index;
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
            WriteDesc(index, buffers[i].Addr, buffers[i].Len, flags, (ushort)((index + 1) % Size));
        }
        _nextDesc = (ushort)((_nextDesc + buffers.Length) % Size);
        Publish(head);
        return head;
    }

    public void Publish(ushort head)
    {
        Memory.Write(new GuestAddress(_avail + 4 + 2UL * (ushort)(_availIdx % Size)), head);
        _availIdx++;
        Memory.Write(new GuestAddress(_avail + 2), _availIdx);
    }

    public void SetAvailIdx(ushort value) => Memory.Write(new GuestAddress(_avail + 2), value);

    public ushort UsedIdx => Memory.Read<ushort>(new GuestAddress(_used + 2));

    public ushort UsedFlags => Memory.Read<ushort>(new GuestAddress(_used));

    public ushort AvailEvent => Memory.Read<ushort>(new GuestAddress(_used + 4 + 8UL * Size));

    public (uint Id, uint Len) Used(ushort i)
    {
        ulong a = _used + 4 + 8UL * (ushort)(i % Size);
        return (Memory.Read<uint>(new GuestAddress(a)), Memory.Read<uint>(new GuestAddress(a + 4)));
    }
}

/// <summary>Counts interrupts per queue.</summary>
internal sealed class CountingVirtioInterrupt : IVirtioInterrupt
{
    private int _rx, _tx, _config;

    public int Rx => Volatile.Read(ref _rx);
    public int Tx => Volatile.Read(ref _tx);
    public int Config => Volatile.Read(ref _config);

    public void Signal(VirtioInterruptType type, int queueIndex)
    {
        if (type == VirtioInterruptType.Config)
            Interlocked.Increment(ref _config);
        else if (queueIndex == VirtioNet.RxQueueIndex)
            Interlocked.Increment(ref _rx);
        else
            Interlocked.Increment(ref _tx);
    }
}

/// <summary>An in-memory back end: frames queued for the guest, frames the guest sent.</summary>
internal sealed class FakeNetBackend : INetBackend
{
    public readonly Queue<byte[]> Inbound = new();
    public readonly List<byte[]> Sent = [];
    public TapOffloads Offloads = (TapOffloads)0xFF;
    public int WriteResult;          // < 0: every write fails with this
    public bool RecordWrites = true; // false: count only (allocation tests)
    public int Writes;
    public byte[]? Repeat;           // non-null: Read returns this frame RepeatCount times
    public int RepeatCount;
    public bool ThrowOnSetOffloads;

    public int Read(Span<byte> buffer)
    {
        byte[] frame;
        if (Repeat is not null)
        {
            if (RepeatCount == 0)
                return -Libc.EAGAIN;
            RepeatCount--;
            frame = Repeat;
        }
        else if (!Inbound.TryDequeue(out frame!))
        {
            return -Libc.EAGAIN;
        }
        frame.AsSpan(0, Math.Min(frame.Length, buffer.Length)).CopyTo(buffer);
        return frame.Length; // may exceed the buffer, as a truncating read(2) on a TAP reports
    }

    public int Write(ReadOnlySpan<byte> frame)
    {
        Writes++;
        if (WriteResult < 0)
            return WriteResult;
        if (RecordWrites)
            Sent.Add(frame.ToArray());
        return frame.Length;
    }

    public void SetOffloads(TapOffloads offloads)
    {
        if (ThrowOnSetOffloads)
            throw new NativeException("TUNSETOFFLOAD(test)", Libc.EINVAL);
        Offloads = offloads;
    }
}

/// <summary>virtio-net over heap guest memory, a mock driver and an in-memory back end.</summary>
public sealed class VirtioNetTests : IDisposable
{
    private const ulong RxDesc = 0x1000, RxAvail = 0x2000, RxUsed = 0x3000;
    private const ulong TxDesc = 0x4000, TxAvail = 0x5000, TxUsed = 0x6000;
    private const ulong RxData = 0x10000, TxData = 0x40000, BigData = 0x80000;
    private static readonly byte[] s_mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    private const ulong BaseFeatures = VirtioFeatures.VERSION_1;

    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);
    private readonly FakeNetBackend _backend = new();
    private readonly CountingVirtioInterrupt _irq = new();
    private readonly VirtioNet _net;
    private readonly NetQueueDriver _rx;
    private readonly NetQueueDriver _tx;

    public VirtioNetTests()
    {
        _net = new VirtioNet(_backend, s_mac, 16);
        _rx = new NetQueueDriver(_memory, RxDesc, RxAvail, RxUsed);
        _tx = new NetQueueDriver(_memory, TxDesc, TxAvail, TxUsed);
    }

    public void Dispose() => _memory.Dispose();

    private void Activate(ulong features)
    {
        bool eventIdx = (features & VirtioFeatures.RING_EVENT_IDX) != 0;
        _rx.Queue.EventIndex = eventIdx; // as the transport does
        _tx.Queue.EventIndex = eventIdx;
        Assert.True(_net.Activate(_memory, features, [_rx.Queue, _tx.Queue], _irq));
    }

    /// <summary>A vnet header (zero: no offload) followed by an Ethernet frame of
    /// <paramref name="payload"/> bytes with a recognisable pattern.</summary>
    private static byte[] Frame(int payload, byte seed = 1, byte flags = 0)
    {
        var f = new byte[VirtioNet.HeaderSize + 14 + payload];
        f[0] = flags;
        for (int i = VirtioNet.HeaderSize; i < f.Length; i++)
            f[i] = (byte)(seed + i * 7);
        return f;
    }

    private byte[] Guest(ulong addr, int length)
    {
        var b = new byte[length];
        _memory.Read(new GuestAddress(addr), b);
        return b;
    }

    private void PutGuest(ulong addr, ReadOnlySpan<byte> data) => _memory.Write(new GuestAddress(addr), data);

    // ---------------------------------------------------------------- identity, config, features

    [Fact]
    public void Identity_ConfigAndFeatures()
    {
        Assert.Equal(1u, _net.DeviceType);
        Assert.Equal(2, _net.QueueCount);
        Assert.Equal(16, _net.QueueMaxSize(0));
        ulong f = _net.DeviceFeatures;
        foreach (ulong bit in new[] { VirtioFeatures.VERSION_1, VirtioNetFeatures.MAC, VirtioNetFeatures.STATUS,
            VirtioNetFeatures.CSUM, VirtioNetFeatures.GUEST_CSUM, VirtioNetFeatures.HOST_TSO4, VirtioNetFeatures.HOST_TSO6,
            VirtioNetFeatures.HOST_ECN, VirtioNetFeatures.GUEST_TSO4, VirtioNetFeatures.GUEST_TSO6, VirtioNetFeatures.GUEST_ECN,
            VirtioNetFeatures.MRG_RXBUF, VirtioFeatures.RING_EVENT_IDX })
            Assert.True((f & bit) != 0, $"feature 0x{bit:x} offered");
        Assert.Equal(0UL, f & (VirtioNetFeatures.CTRL_VQ | VirtioNetFeatures.GUEST_UFO | VirtioNetFeatures.HOST_UFO));

        var config = new byte[16];
        _net.ReadConfig(0, config);
        Assert.Equal(s_mac, config[..6]);
        Assert.Equal(1, BinaryPrimitives.ReadUInt16LittleEndian(config.AsSpan(6))); // LINK_UP
        Assert.Equal(1, BinaryPrimitives.ReadUInt16LittleEndian(config.AsSpan(8))); // max_virtqueue_pairs
        Assert.All(config[10..], b => Assert.Equal(0, b));
        var two = new byte[2];
        _net.ReadConfig(6, two);
        Assert.Equal(new byte[] { 1, 0 }, two);
        _net.ReadConfig(1000, two);
        Assert.Equal(new byte[2], two);
        _net.WriteConfig(0, new byte[] { 0xff, 0xff }); // read-only: ignored
        _net.ReadConfig(0, config);
        Assert.Equal(s_mac, config[..6]);
    }

    [Fact]
    public void Constructor_RejectsBadMac()
    {
        Assert.Throws<ArgumentException>(() => new VirtioNet(_backend, new byte[5]));
        Assert.Throws<ArgumentException>(() => new VirtioNet(_backend, new byte[] { 1, 0, 0, 0, 0, 0 })); // multicast
        Assert.Throws<ArgumentOutOfRangeException>(() => new VirtioNet(_backend, s_mac, 3));
    }

    [Fact]
    public void LinkUp_ChangeRaisesConfigInterrupt()
    {
        Activate(BaseFeatures);
        _net.LinkUp = false;
        Assert.Equal(1, _irq.Config);
        var status = new byte[2];
        _net.ReadConfig(6, status);
        Assert.Equal(new byte[] { 0, 0 }, status);
        _net.LinkUp = false; // no change, no interrupt
        Assert.Equal(1, _irq.Config);
        _net.LinkUp = true;
        Assert.Equal(2, _irq.Config);
    }

    [Theory]
    [InlineData(0UL, TapOffloads.None)]
    [InlineData(VirtioNetFeatures.GUEST_TSO4, TapOffloads.None)] // TSO needs GUEST_CSUM
    [InlineData(VirtioNetFeatures.GUEST_CSUM, TapOffloads.Csum)]
    [InlineData(VirtioNetFeatures.GUEST_CSUM | VirtioNetFeatures.GUEST_TSO4 | VirtioNetFeatures.GUEST_TSO6 | VirtioNetFeatures.GUEST_ECN,
        TapOffloads.Csum | TapOffloads.Tso4 | TapOffloads.Tso6 | TapOffloads.TsoEcn)]
    [InlineData(VirtioNetFeatures.GUEST_CSUM | VirtioNetFeatures.GUEST_ECN, TapOffloads.Csum)] // ECN needs TSO
    [InlineData(VirtioNetFeatures.CSUM | VirtioNetFeatures.HOST_TSO4, TapOffloads.None)] // host side: not for the TAP's reads
    public void Activate_HandsTheGuestsReceiveOffloadsToTheBackend(ulong features, TapOffloads expected)
    {
        Assert.Equal(expected, VirtioNet.OffloadsFor(features));
        Activate(BaseFeatures | features);
        Assert.Equal(expected, _backend.Offloads);
    }

    [Fact]
    public void Activate_FailsWhenTheBackendRefusesOffloads_OrAQueueIsNotReady()
    {
        _backend.ThrowOnSetOffloads = true;
        Assert.False(_net.Activate(_memory, BaseFeatures, [_rx.Queue, _tx.Queue], _irq));
        _backend.ThrowOnSetOffloads = false;
        var notReady = new VirtQueue(16);
        Assert.False(_net.Activate(_memory, BaseFeatures, [_rx.Queue, notReady], _irq));
        Assert.False(_net.Activate(_memory, BaseFeatures, [_rx.Queue], _irq));
        Assert.Equal(NetRxStatus.NotRunning, _net.ProcessRx());
    }

    [Fact]
    public void ThroughVirtioMmio_NegotiatesAndRuns()
    {
        var line = new CountingLine();
        var mmio = TestTransports.Mmio(_net, _memory, line);
        void W(ulong offset, uint value)
        {
            Span<byte> b = stackalloc byte[4];
            BinaryPrimitives.WriteUInt32LittleEndian(b, value);
            mmio.Write(offset, b);
        }
        uint R(ulong offset)
        {
            Span<byte> b = stackalloc byte[4];
            mmio.Read(offset, b);
            return BinaryPrimitives.ReadUInt32LittleEndian(b);
        }
        Assert.Equal(1u, R(0x008)); // DeviceID: network card
        W(0x70, 0); W(0x70, 1); W(0x70, 3);
        W(0x14, 0);
        Assert.NotEqual(0u, R(0x10) & (1u << 15)); // MRG_RXBUF
        W(0x24, 0); W(0x20, (uint)(VirtioNetFeatures.MAC | VirtioNetFeatures.MRG_RXBUF | VirtioNetFeatures.GUEST_CSUM));
        W(0x24, 1); W(0x20, 1); // VERSION_1
        W(0x70, 11);
        foreach ((uint q, ulong d, ulong a, ulong u) in new[] { (0u, RxDesc, RxAvail, RxUsed), (1u, TxDesc, TxAvail, TxUsed) })
        {
            W(0x30, q);
            Assert.Equal(16u, R(0x34));
            W(0x38, 16);
            W(0x80, (uint)d); W(0x84, 0);
            W(0x90, (uint)a); W(0x94, 0);
            W(0xa0, (uint)u); W(0xa4, 0);
            W(0x44, 1);
        }
        W(0x70, 15);
        Assert.Equal(15u, R(0x70));
        Assert.Equal(TapOffloads.Csum, _backend.Offloads);
        Assert.Equal(0x52u, R(0x100) & 0xff); // config: MAC

        byte[] frame = Frame(50);
        _tx.AddChain((TxData, (uint)frame.Length, false));
        PutGuest(TxData, frame);
        W(0x50, 1); // QueueNotify(tx)
        Assert.Single(_backend.Sent);
        Assert.Equal(frame, _backend.Sent[0]);
        Assert.Equal(1, line.Count);

        _backend.Inbound.Enqueue(Frame(100, seed: 9));
        _rx.AddChain((RxData, 2048, true));
        W(0x50, 0); // QueueNotify(rx): buffers posted -> frame delivered
        Assert.Equal(1, _rx.UsedIdx);
        Assert.Equal(126u, _rx.Used(0).Len);
        Assert.Equal(2, line.Count);
    }

    // ---------------------------------------------------------------- transmit

    [Fact]
    public void Tx_FrameWithoutOffload_IsWrittenWithItsHeader_AndUsedWithLengthZero()
    {
        Activate(BaseFeatures);
        byte[] frame = Frame(60);
        // Header and frame in separate descriptors, as Linux does without ANY_LAYOUT tricks.
        PutGuest(TxData, frame.AsSpan(0, 12));
        PutGuest(TxData + 0x100, frame.AsSpan(12));
        ushort head = _tx.AddChain((TxData, 12, false), (TxData + 0x100, (uint)frame.Length - 12, false));
        _net.QueueNotify(VirtioNet.TxQueueIndex);

        Assert.Single(_backend.Sent);
        Assert.Equal(frame, _backend.Sent[0]);
        Assert.Equal(1, _tx.UsedIdx);
        Assert.Equal(((uint)head, 0u), _tx.Used(0));
        Assert.Equal(1, _irq.Tx);
        Assert.Equal(1, _net.TxFrames);
        Assert.Equal(74, _net.TxBytes);
        Assert.Equal(0, _net.BadChains);
    }

    [Fact]
    public void Tx_ChecksumOffloadHeader_PassesThroughUnchanged()
    {
        Activate(BaseFeatures | VirtioNetFeatures.CSUM | VirtioNetFeatures.HOST_TSO4);
        byte[] frame = Frame(1400);
        frame[0] = 1;                                                     // VIRTIO_NET_HDR_F_NEEDS_CSUM
        frame[1] = 1;                                                     // GSO_TCPV4
        BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(2), 54);    // hdr_len
        BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(4), 1448);  // gso_size
        BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(6), 34);    // csum_start
        BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(8), 16);    // csum_offset
        PutGuest(TxData, frame);
        _tx.AddChain((TxData, (uint)frame.Length, false));
        _net.ProcessTx();
        Assert.Equal(frame, Assert.Single(_backend.Sent));
    }

    [Fact]
    public void Tx_LargestFrame_IsSent_AndOneByteMoreIsDropped()
    {
        Activate(BaseFeatures);
        int max = VirtioNet.HeaderSize + VirtioNet.MaxFrameSize;
        _tx.AddChain((BigData, (uint)max, false));
        _tx.AddChain((BigData, (uint)max + 1, false));
        _net.ProcessTx();
        Assert.Equal(max, Assert.Single(_backend.Sent).Length);
        Assert.Equal(1, _net.BadChains);
        Assert.Equal(2, _tx.UsedIdx);
    }

    [Fact]
    public void Tx_ManyChains_OneInterruptWithEventIdx()
    {
        Activate(BaseFeatures | VirtioFeatures.RING_EVENT_IDX);
        for (int i = 0; i < 10; i++)
        {
            PutGuest(TxData + 0x1000UL * (ulong)i, Frame(40, (byte)i));
            _tx.AddChain((TxData + 0x1000UL * (ulong)i, (uint)Frame(40).Length, false));
        }
        _net.ProcessTx();
        Assert.Equal(10, _backend.Sent.Count);
        for (int i = 0; i < 10; i++)
            Assert.Equal(Frame(40, (byte)i), _backend.Sent[i]);
        Assert.Equal(1, _irq.Tx);
        Assert.Equal(10, _tx.AvailEvent); // kick again once avail.idx passes 10
    }

    [Fact]
    public void Tx_BackendWriteFailure_IsCounted_AndTheChainReturned()
    {
        Activate(BaseFeatures);
        _backend.WriteResult = -Libc.EINVAL;
        PutGuest(TxData, Frame(40));
        _tx.AddChain((TxData, (uint)Frame(40).Length, false));
        _net.ProcessTx();
        Assert.Equal(1, _net.TxErrors);
        Assert.Equal(0, _net.TxFrames);
        Assert.Equal(1, _tx.UsedIdx);
    }

    public static TheoryData<string> BadTxChains =>
        ["empty header", "header only", "runt frame", "write-only", "readable then writable", "outside RAM", "straddles RAM end", "loop", "next out of range"];

    [Theory]
    [MemberData(nameof(BadTxChains))]
    public void Tx_MalformedChain_IsDroppedAndCounted_NeverThrows(string kind)
    {
        Activate(BaseFeatures);
        ushort head = 0;
        switch (kind)
        {
            case "empty header": head = _tx.AddChain((TxData, 6, false)); break;
            case "header only": head = _tx.AddChain((TxData, 12, false)); break;
            case "runt frame": head = _tx.AddChain((TxData, 12 + 13, false)); break;
            case "write-only": head = _tx.AddChain((TxData, 100, true)); break;
            case "readable then writable": head = _tx.AddChain((TxData, 100, false), (TxData + 0x100, 100, true)); break;
            case "outside RAM": head = _tx.AddChain((0x4000_0000UL, 100, false)); break;
            case "straddles RAM end": head = _tx.AddChain(((1UL << 20) - 50, 100, false)); break;
            case "loop":
                _tx.WriteDesc(5, TxData, 100, NetQueueDriver.F_NEXT, 5);
                _tx.Publish(5);
                head = 5;
                break;
            case "next out of range":
                _tx.WriteDesc(5, TxData, 100, NetQueueDriver.F_NEXT, 99);
                _tx.Publish(5);
                head = 5;
                break;
        }
        // A good frame after it still goes out.
        byte[] good = Frame(30);
        PutGuest(TxData + 0x8000, good);
        _tx.AddChain((TxData + 0x8000, (uint)good.Length, false));

        _net.QueueNotify(VirtioNet.TxQueueIndex);
        Assert.Equal(1, _net.BadChains);
        Assert.Equal(good, Assert.Single(_backend.Sent));
        Assert.Equal(2, _tx.UsedIdx);
        Assert.Equal(((uint)head, 0u), _tx.Used(0));
        Assert.False(_net.Broken);
    }

    [Fact]
    public void BrokenRing_StopsTheDeviceUntilReset()
    {
        Activate(BaseFeatures);
        _tx.SetAvailIdx(100); // more than a queue size ahead
        _net.ProcessTx();
        Assert.True(_net.Broken);
        Assert.Empty(_backend.Sent);
        _rx.SetAvailIdx(50);
        _backend.Inbound.Enqueue(Frame(20));
        Assert.Equal(NetRxStatus.NotRunning, _net.ProcessRx());

        _net.Reset();
        Assert.False(_net.Broken);
        Assert.Equal(NetRxStatus.NotRunning, _net.ProcessRx());
        _net.QueueNotify(VirtioNet.TxQueueIndex);
        _net.QueueNotify(7); // no such queue: ignored
    }

    // ---------------------------------------------------------------- receive

    [Fact]
    public void Rx_WithoutMergeable_OneFramePerChain_NumBuffersOne()
    {
        Activate(BaseFeatures);
        byte[] f1 = Frame(100, 3), f2 = Frame(1500, 4);
        _backend.Inbound.Enqueue(f1);
        _backend.Inbound.Enqueue(f2);
        ushort h1 = _rx.AddChain((RxData, 1526, true));
        ushort h2 = _rx.AddChain((RxData + 0x1000, 12, true), (RxData + 0x2000, 1514, true)); // header apart

        Assert.Equal(NetRxStatus.BackendEmpty, _net.ProcessRx());
        Assert.Equal(2, _rx.UsedIdx);
        Assert.Equal(((uint)h1, (uint)f1.Length), _rx.Used(0));
        Assert.Equal(((uint)h2, (uint)f2.Length), _rx.Used(1));
        byte[] e1 = (byte[])f1.Clone();
        e1[10] = 1; // num_buffers = 1 (virtio 1.2 §5.1.6.4)
        Assert.Equal(e1, Guest(RxData, f1.Length));
        byte[] e2 = (byte[])f2.Clone();
        e2[10] = 1;
        Assert.Equal(e2[..12], Guest(RxData + 0x1000, 12));
        Assert.Equal(e2[12..], Guest(RxData + 0x2000, 1514));
        Assert.Equal(1, _irq.Rx);
        Assert.Equal(2, _net.RxFrames);
        Assert.Equal(100 + 14 + 1500 + 14, _net.RxBytes);
    }

    [Fact]
    public void Rx_WithoutMergeable_FrameTooBigForTheChain_IsDropped_ChainKeptForTheNext()
    {
        Activate(BaseFeatures);
        _backend.Inbound.Enqueue(Frame(2000));
        _backend.Inbound.Enqueue(Frame(50, 5));
        ushort head = _rx.AddChain((RxData, 1526, true));
        _net.ProcessRx();
        Assert.Equal(1, _net.RxDropped);
        Assert.Equal(1, _rx.UsedIdx);
        Assert.Equal(((uint)head, (uint)Frame(50).Length), _rx.Used(0));
        Assert.Equal(Frame(50, 5)[12..], Guest(RxData + 12, Frame(50).Length - 12));
    }

    [Fact]
    public void Rx_Mergeable_SpansChains_AndSetsNumBuffers()
    {
        Activate(BaseFeatures | VirtioNetFeatures.MRG_RXBUF);
        byte[] frame = Frame(3000, 7); // 3026 bytes with the header
        _backend.Inbound.Enqueue(frame);
        // First chain: header split across two descriptors (num_buffers straddles them).
        ushort h0 = _rx.AddChain((RxData, 11, true), (RxData + 0x100, 1013, true));
        ushort h1 = _rx.AddChain((RxData + 0x1000, 1024, true));
        ushort h2 = _rx.AddChain((RxData + 0x2000, 1024, true));
        ushort h3 = _rx.AddChain((RxData + 0x3000, 1024, true)); // not needed

        Assert.Equal(NetRxStatus.BackendEmpty, _net.ProcessRx());
        Assert.Equal(3, _rx.UsedIdx);
        Assert.Equal(((uint)h0, 1024u), _rx.Used(0));
        Assert.Equal(((uint)h1, 1024u), _rx.Used(1));
        Assert.Equal(((uint)h2, 978u), _rx.Used(2));
        byte[] expected = (byte[])frame.Clone();
        BinaryPrimitives.WriteUInt16LittleEndian(expected.AsSpan(10), 3);
        byte[] got = [.. Guest(RxData, 11), .. Guest(RxData + 0x100, 1013), .. Guest(RxData + 0x1000, 1024), .. Guest(RxData + 0x2000, 978)];
        Assert.Equal(expected, got);
        Assert.Equal(1, _irq.Rx);

        // The fourth chain takes the next frame alone.
        _backend.Inbound.Enqueue(Frame(10, 1));
        _net.ProcessRx();
        Assert.Equal(((uint)h3, (uint)Frame(10).Length), _rx.Used(3));
        Assert.Equal(1, BinaryPrimitives.ReadUInt16LittleEndian(Guest(RxData + 0x3000 + 10, 2)));
    }

    /// <summary>
    /// A driver polling used.idx (as Linux's NAPI poll does, concurrently with the device) must
    /// never see a mergeable frame's first buffer without the num_buffers - 1 that follow it
    /// (virtio 1.2 §5.1.6.4). Every frame here takes exactly three buffers, so every value of
    /// used.idx the driver can observe is a multiple of three. Publishing each used entry on its
    /// own exposes 1 and 2 mod 3 for a moment on every frame; over thousands of frames the
    /// watcher thread sees them.
    /// </summary>
    [Fact]
    public void Rx_Mergeable_FrameBuffersArePublishedTogether_ConcurrentDriverNeverSeesHalfAFrame()
    {
        Activate(BaseFeatures | VirtioNetFeatures.MRG_RXBUF | VirtioFeatures.RING_EVENT_IDX);
        _backend.RecordWrites = false;
        byte[] frame = Frame(2500 - 26); // 2500 bytes: three 1024-byte buffers
        const int FramesPerRound = 5, Rounds = 3000; // 15 buffers of the 16; used.idx stays < 65536
        int torn = 0, samples = 0;
        bool stop = false;
        using var started = new ManualResetEventSlim();
        var watcher = new Thread(() =>
        {
            started.Set();
            while (!Volatile.Read(ref stop))
            {
                // (An exception on this thread would take the test host down: count, don't assert.)
                if (!_memory.TryReadVolatileUInt16(new GuestAddress(RxUsed + 2), out ushort idx) || idx % 3 != 0)
                    torn++;
                Volatile.Write(ref samples, samples + 1); // single writer
            }
        });
        watcher.Start();
        started.Wait(TestContext.Current.CancellationToken);
        for (int round = 0; round < Rounds; round++)
        {
            // Make sure the watcher is on a CPU now, not descheduled for the whole test.
            int seen = Volatile.Read(ref samples);
            SpinWait.SpinUntil(() => Volatile.Read(ref samples) != seen, 1000);
            for (int i = 0; i < 3 * FramesPerRound; i++)
                _rx.AddChain((RxData + 0x400UL * (ulong)i, 1024, true));
            _backend.Repeat = frame;
            _backend.RepeatCount = FramesPerRound;
            Assert.Equal(NetRxStatus.BackendEmpty, _net.ProcessRx());
        }
        Volatile.Write(ref stop, true);
        watcher.Join();
        Assert.Equal(Rounds * FramesPerRound, _net.RxFrames);
        Assert.Equal((ushort)(Rounds * FramesPerRound * 3), _rx.UsedIdx);
        Assert.True(torn == 0, $"the driver saw a partly published frame {torn} times in {samples} samples");
    }

    [Fact]
    public void Rx_NoBuffers_FrameWaits_ThenBuffersPosted_AndEventIdxAsksForTheKick()
    {
        Activate(BaseFeatures | VirtioNetFeatures.MRG_RXBUF | VirtioFeatures.RING_EVENT_IDX);
        byte[] frame = Frame(1800, 2);
        _backend.Inbound.Enqueue(frame);
        _backend.Inbound.Enqueue(Frame(40, 3));
        Assert.Equal(NetRxStatus.WaitingForBuffers, _net.ProcessRx());
        Assert.Single(_backend.Inbound); // the first frame was read and is held, not lost
        Assert.Equal(0, _rx.AvailEvent); // "kick me when you add buffer 0"

        // One buffer: not enough for the frame; the device keeps it and waits for more.
        _rx.AddChain((RxData, 1024, true));
        Assert.Equal(NetRxStatus.WaitingForBuffers, _net.ProcessRx());
        Assert.Equal(0, _rx.UsedIdx); // nothing published before the frame is complete
        Assert.Equal(1, _rx.AvailEvent);
        Assert.Equal(0, _irq.Rx);

        _rx.AddChain((RxData + 0x1000, 1024, true));
        _rx.AddChain((RxData + 0x2000, 1024, true));
        _net.QueueNotify(VirtioNet.RxQueueIndex); // the guest's kick
        Assert.Equal(3, _rx.UsedIdx);
        Assert.Equal(2, BinaryPrimitives.ReadUInt16LittleEndian(Guest(RxData + 10, 2)));
        Assert.Equal((1024u, 1826u - 1024u), (_rx.Used(0).Len, _rx.Used(1).Len));
        Assert.Equal((uint)Frame(40).Length, _rx.Used(2).Len);
        Assert.Equal(frame[12..1024], Guest(RxData + 12, 1012));
        Assert.Equal(frame[1024..], Guest(RxData + 0x1000, 1826 - 1024));
        Assert.Equal(2, _net.RxFrames);
        Assert.Equal(0, _net.RxDropped);
    }

    [Fact]
    public void Rx_NoBuffers_WithoutEventIdx_ClearsNoNotify_AndSetsItWhenDrained()
    {
        Activate(BaseFeatures);
        _rx.AddChain((RxData, 1526, true));
        Assert.Equal(NetRxStatus.BackendEmpty, _net.ProcessRx());
        Assert.Equal(1, _rx.UsedFlags); // VIRTQ_USED_F_NO_NOTIFY while the device has buffers and nothing to do
        _backend.Inbound.Enqueue(Frame(40));
        _backend.Inbound.Enqueue(Frame(40));
        Assert.Equal(NetRxStatus.WaitingForBuffers, _net.ProcessRx());
        Assert.Equal(0, _rx.UsedFlags); // kicks wanted now
        _rx.AddChain((RxData + 0x1000, 1526, true));
        Assert.Equal(NetRxStatus.BackendEmpty, _net.ProcessRx());
        Assert.Equal(2, _rx.UsedIdx);
    }

    [Fact]
    public void Rx_Budget_ReturnsMoreWork()
    {
        var net = new VirtioNet(_backend, s_mac, 1024);
        var rx = new NetQueueDriver(_memory, 0x20000, 0x30000, 0x32000, 1024);
        var tx = new NetQueueDriver(_memory, 0x34000, 0x3c000, 0x3e000, 16);
        Assert.True(net.Activate(_memory, BaseFeatures | VirtioNetFeatures.MRG_RXBUF, [rx.Queue, tx.Queue], _irq));
        for (int i = 0; i < 300; i++)
            rx.AddChain((RxData + 0x100UL * (ulong)(i % 64), 128, true));
        _backend.Repeat = Frame(60);
        _backend.RepeatCount = 300;
        Assert.Equal(NetRxStatus.MoreWork, net.ProcessRx());
        Assert.Equal(VirtioNet.RxBudget, net.RxFrames);
        Assert.Equal(NetRxStatus.BackendEmpty, net.ProcessRx());
        Assert.Equal(300, net.RxFrames);
    }

    public static TheoryData<string> BadRxChains => ["read-only", "too short for the header", "outside RAM", "loop"];

    [Theory]
    [MemberData(nameof(BadRxChains))]
    public void Rx_MalformedChain_IsReturnedEmptyAndCounted_FrameGoesToTheNext(string kind)
    {
        foreach (bool mergeable in new[] { false, true })
        {
            using var memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);
            var backend = new FakeNetBackend();
            var net = new VirtioNet(backend, s_mac, 16);
            var rx = new NetQueueDriver(memory, RxDesc, RxAvail, RxUsed);
            var tx = new NetQueueDriver(memory, TxDesc, TxAvail, TxUsed);
            Assert.True(net.Activate(memory, BaseFeatures | (mergeable ? VirtioNetFeatures.MRG_RXBUF : 0), [rx.Queue, tx.Queue], _irq));
            ushort bad = 0;
            switch (kind)
            {
                case "read-only": bad = rx.AddChain((RxData, 2048, false)); break;
                case "too short for the header": bad = rx.AddChain((RxData, 4, true), (RxData + 0x100, 7, true)); break;
                case "outside RAM": bad = rx.AddChain((0x7000_0000UL, 2048, true)); break;
                case "loop":
                    rx.WriteDesc(9, RxData, 100, NetQueueDriver.F_NEXT | NetQueueDriver.F_WRITE, 9);
                    rx.Publish(9);
                    bad = 9;
                    break;
            }
            ushort good = rx.AddChain((RxData + 0x1000, 2048, true));
            byte[] frame = Frame(200, 6);
            backend.Inbound.Enqueue(frame);
            Assert.Equal(NetRxStatus.BackendEmpty, net.ProcessRx());
            Assert.Equal(1, net.BadChains);
            Assert.Equal(2, rx.UsedIdx);
            Assert.Equal(((uint)bad, 0u), rx.Used(0));
            Assert.Equal(((uint)good, (uint)frame.Length), rx.Used(1));
            Assert.Equal(frame[12..], ReadGuest(memory, RxData + 0x1000 + 12, frame.Length - 12));
            Assert.False(net.Broken);
        }
    }

    private static byte[] ReadGuest(GuestMemory memory, ulong addr, int length)
    {
        var b = new byte[length];
        memory.Read(new GuestAddress(addr), b);
        return b;
    }

    [Fact]
    public void Rx_Mergeable_BadChainMidFrame_IsReturnedAfterTheFramesBuffers()
    {
        Activate(BaseFeatures | VirtioNetFeatures.MRG_RXBUF);
        byte[] frame = Frame(1500, 8); // 1526 bytes
        _backend.Inbound.Enqueue(frame);
        ushort h0 = _rx.AddChain((RxData, 1024, true));
        ushort bad = _rx.AddChain((RxData + 0x1000, 1024, false)); // read-only: unusable
        ushort h1 = _rx.AddChain((RxData + 0x2000, 1024, true));
        _net.ProcessRx();
        Assert.Equal(3, _rx.UsedIdx);
        Assert.Equal(((uint)h0, 1024u), _rx.Used(0));
        Assert.Equal(((uint)h1, 502u), _rx.Used(1)); // the frame's buffers are consecutive
        Assert.Equal(((uint)bad, 0u), _rx.Used(2));
        Assert.Equal(2, BinaryPrimitives.ReadUInt16LittleEndian(Guest(RxData + 10, 2)));
        Assert.Equal(1, _net.BadChains);
    }

    [Fact]
    public void Rx_Mergeable_FrameLargerThanTheWholeRing_IsDropped_BuffersReturned()
    {
        Activate(BaseFeatures | VirtioNetFeatures.MRG_RXBUF);
        _backend.Inbound.Enqueue(Frame(5000));
        for (int i = 0; i < 16; i++)
            _rx.AddChain((RxData + 0x100UL * (ulong)i, 64, true)); // 16 x 64 bytes: never enough
        _net.ProcessRx();
        Assert.Equal(1, _net.RxDropped);
        Assert.Equal(16, _rx.UsedIdx);
        for (ushort i = 0; i < 16; i++)
            Assert.Equal(0u, _rx.Used(i).Len);
        Assert.Equal(0, _net.RxFrames);
    }

    [Fact]
    public void Rx_RuntAndTruncatedFramesFromTheBackend_AreDropped()
    {
        Activate(BaseFeatures | VirtioNetFeatures.MRG_RXBUF);
        _backend.Inbound.Enqueue(new byte[VirtioNet.HeaderSize + 13]);
        _backend.Inbound.Enqueue(new byte[VirtioNet.HeaderSize + VirtioNet.MaxFrameSize + 1]);
        _backend.Inbound.Enqueue(Frame(20));
        _rx.AddChain((RxData, 2048, true));
        _net.ProcessRx();
        Assert.Equal(2, _net.RxDropped);
        Assert.Equal(1, _net.RxFrames);
        Assert.Equal(1, _rx.UsedIdx);
    }

    [Fact]
    public void Rx_LargestFrame_FitsOneBigBuffer()
    {
        Activate(BaseFeatures | VirtioNetFeatures.GUEST_CSUM | VirtioNetFeatures.GUEST_TSO4);
        byte[] frame = Frame(VirtioNet.MaxFrameSize - 14);
        _backend.Inbound.Enqueue(frame);
        _rx.AddChain((BigData, (uint)frame.Length, true));
        _net.ProcessRx();
        Assert.Equal((uint)frame.Length, _rx.Used(0).Len);
        Assert.Equal(frame[12..], Guest(BigData + 12, frame.Length - 12));
    }

    [Fact]
    public void Reset_DiscardsTheWaitingFrame()
    {
        Activate(BaseFeatures);
        _backend.Inbound.Enqueue(Frame(20));
        Assert.Equal(NetRxStatus.WaitingForBuffers, _net.ProcessRx());
        _net.Reset();
        _rx.Queue.Reset();
        _tx.Queue.Reset();
        var rx = new NetQueueDriver(_memory, RxDesc + 0x800, RxAvail + 0x800, RxUsed + 0x800);
        var tx = new NetQueueDriver(_memory, TxDesc + 0x800, TxAvail + 0x800, TxUsed + 0x800);
        Assert.True(_net.Activate(_memory, BaseFeatures, [rx.Queue, tx.Queue], _irq));
        rx.AddChain((RxData, 2048, true));
        Assert.Equal(NetRxStatus.BackendEmpty, _net.ProcessRx());
        Assert.Equal(0, rx.UsedIdx);
    }

    // ---------------------------------------------------------------- allocation, hostile input

    [Fact]
    public void SteadyState_DeviceAlone_DoesNotAllocate()
    {
        Activate(BaseFeatures | VirtioNetFeatures.MRG_RXBUF);
        _backend.RecordWrites = false;
        byte[] frame = Frame(1500);
        PutGuest(TxData, frame);
        _backend.Repeat = Frame(3000);
        // Prepare every ring entry up front so the measured loop runs only device code.
        for (int i = 0; i < 8; i++)
        {
            _tx.AddChain((TxData, (uint)frame.Length, false));
            _rx.AddChain((RxData + 0x1000UL * (ulong)i, 1024, true));
        }
        _net.ProcessTx();
        _backend.RepeatCount = 1;
        _net.ProcessRx();
        Assert.Equal(1, _net.RxFrames);
        for (int i = 0; i < 8; i++)
            _tx.AddChain((TxData, (uint)frame.Length, false));
        _rx.AddChain((RxData + 0x9000, 1024, true));
        long before = GC.GetAllocatedBytesForCurrentThread();
        _net.ProcessTx();
        _backend.RepeatCount = 2;
        _net.ProcessRx();
        long after = GC.GetAllocatedBytesForCurrentThread();
        Assert.Equal(16, _backend.Writes);
        Assert.Equal(3, _net.RxFrames);
        Assert.Equal(before, after);
    }

    /// <summary>Hostile input (style.md §7): random descriptor tables and rings, fixed seeds.
    /// Nothing throws; every used length stays within what the device may write.</summary>
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(4)]
    public void RandomRings_NeverThrow(int seed)
    {
        var random = new Random(seed);
        Activate(BaseFeatures | (seed % 2 == 0 ? VirtioNetFeatures.MRG_RXBUF : 0) | (seed > 2 ? VirtioFeatures.RING_EVENT_IDX : 0));
        for (int round = 0; round < 200; round++)
        {
            foreach (ulong table in new[] { RxDesc, TxDesc })
            {
                for (int d = 0; d < 16; d++)
                {
                    ulong addr = random.Next(4) switch
                    {
                        0 => (ulong)random.NextInt64(),
                        1 => (1UL << 20) - (ulong)random.Next(0, 4096),
                        _ => RxData + (ulong)random.Next(0, 0x60000),
                    };
                    uint len = random.Next(3) == 0 ? (uint)random.Next() : (uint)random.Next(0, 4096);
                    var desc = new byte[16];
                    BinaryPrimitives.WriteUInt64LittleEndian(desc, addr);
                    BinaryPrimitives.WriteUInt32LittleEndian(desc.AsSpan(8), len);
                    BinaryPrimitives.WriteUInt16LittleEndian(desc.AsSpan(12), (ushort)random.Next(8));
                    BinaryPrimitives.WriteUInt16LittleEndian(desc.AsSpan(14), (ushort)random.Next(20));
                    PutGuest(table + 16UL * (ulong)d, desc);
                }
            }
            for (int i = 0; i < random.Next(4); i++)
                _rx.Publish((ushort)random.Next(16));
            for (int i = 0; i < random.Next(4); i++)
                _tx.Publish((ushort)random.Next(16));
            if (random.Next(50) == 0)
                _rx.SetAvailIdx((ushort)random.Next());
            if (random.Next(3) == 0)
                _backend.Inbound.Enqueue(Frame(random.Next(0, 5000), (byte)round));
            if (random.Next(40) == 0)
                _backend.Inbound.Enqueue(new byte[random.Next(0, 30)]);
            _net.ProcessTx();
            _net.ProcessRx();
            for (ushort u = 0; u < _rx.UsedIdx && u < 16; u++)
                Assert.True(_rx.Used(u).Len <= VirtioNet.HeaderSize + VirtioNet.MaxFrameSize);
            if (_net.Broken)
            {
                _net.Reset();
                _rx.Queue.Reset();
                _tx.Queue.Reset();
                var rx = new NetQueueDriver(_memory, RxDesc, RxAvail, RxUsed);
                var tx = new NetQueueDriver(_memory, TxDesc, TxAvail, TxUsed);
                _memory.Write(new GuestAddress(RxAvail + 2), (ushort)0);
                _memory.Write(new GuestAddress(TxAvail + 2), (ushort)0);
                Assert.True(_net.Activate(_memory, BaseFeatures, [rx.Queue, tx.Queue], _irq));
                return; // the fresh drivers' indices no longer match this loop's; one broken ring per seed is enough
            }
        }
    }

    [Fact]
    public void TapIfreq_IsFortyBytes()
    {
        Assert.Equal(40, Unsafe.SizeOf<Tap.ifreq>());
        Assert.Equal(16, (int)System.Runtime.InteropServices.Marshal.OffsetOf<Tap.ifreq>(nameof(Tap.ifreq.ifr_flags)));
        Assert.Equal(12, Tap.VnetHeaderSize);
        Assert.Equal(VirtioNet.HeaderSize, Tap.VnetHeaderSize);
    }
}
