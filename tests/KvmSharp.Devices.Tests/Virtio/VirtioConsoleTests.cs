using System.Buffers.Binary;
using System.Text;
using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

public sealed class VirtioConsoleTests : IDisposable
{
    private const int Rx = 0, Tx = 1;
    private const ulong Buf = 0x40000;

    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);
    private readonly MemoryStream _output = new();
    private readonly CountingInterrupt _irq = new();
    private readonly VirtioConsole _console;
    private readonly MultiQueueDriver _driver;

    public VirtioConsoleTests()
    {
        _console = new VirtioConsole(_output, queueSize: 16, cols: 132, rows: 43);
        _driver = new MultiQueueDriver(_memory, 2, 16);
    }

    public void Dispose() => _memory.Dispose();

    private void Activate() =>
        Assert.True(_console.Activate(_memory, _console.DeviceFeatures, _driver.Queues, _irq));

    private string Output => Encoding.ASCII.GetString(_output.ToArray());

    [Fact]
    public void Config_AndFeatures()
    {
        Assert.Equal(VirtioDeviceType.Console, _console.DeviceType);
        Assert.Equal(2, _console.QueueCount);
        Assert.NotEqual(0UL, _console.DeviceFeatures & VirtioConsoleFeatures.SIZE);
        Assert.Equal(0UL, _console.DeviceFeatures & VirtioConsoleFeatures.MULTIPORT);
        var config = new byte[12];
        _console.ReadConfig(0, config);
        Assert.Equal(132, BinaryPrimitives.ReadUInt16LittleEndian(config));
        Assert.Equal(43, BinaryPrimitives.ReadUInt16LittleEndian(config.AsSpan(2)));
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(config.AsSpan(8)));
        var far = new byte[4] { 1, 2, 3, 4 };
        _console.ReadConfig(100, far);
        Assert.Equal(new byte[4], far);
    }

    [Fact]
    public void Transmit_WritesChainsToTheStream()
    {
        Activate();
        _memory.Write(new GuestAddress(Buf), "hello, "u8);
        _memory.Write(new GuestAddress(Buf + 0x100), "wor"u8);
        _memory.Write(new GuestAddress(Buf + 0x200), "ld\n"u8);
        ushort a = _driver.AddChain(Tx, (Buf, 7, false));
        ushort b = _driver.AddChain(Tx, (Buf + 0x100, 3, false), (Buf + 0x200, 3, false));
        _console.QueueNotify(Tx);
        Assert.Equal("hello, world\n", Output);
        Assert.Equal(2, _driver.UsedIdx(Tx));
        Assert.Equal((a, 0u), _driver.Used(Tx, 0));
        Assert.Equal((b, 0u), _driver.Used(Tx, 1));
        Assert.Equal(1, _irq.QueueSignals);
        Assert.Equal(Tx, _irq.LastQueue);
        Assert.Equal(13, _console.BytesOut);
    }

    [Fact]
    public void TransmitAndReceive_AllocateNothing()
    {
        var console = new VirtioConsole(Stream.Null, queueSize: 16);
        Assert.True(console.Activate(_memory, console.DeviceFeatures, _driver.Queues, _irq));
        for (int round = 0; round < 2; round++)
        {
            _driver.AddChain(Tx, (Buf, 100, false));
            _driver.AddChain(Rx, (Buf + 0x1000, 100, true));
            long before = GC.GetAllocatedBytesForCurrentThread();
            console.QueueNotify(Tx);
            console.EnqueueInput("abc"u8);
            long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            if (round == 1)
                Assert.Equal(0, allocated);
        }
        Assert.Equal(6, console.BytesIn);
    }

    [Fact]
    public void Transmit_BadChainIsReturnedAndNothingIsWritten()
    {
        Activate();
        _driver.AddChain(Tx, (3UL << 20, 8, false)); // outside RAM
        _console.QueueNotify(Tx);
        Assert.Equal(1, _driver.UsedIdx(Tx));
        Assert.Equal(0u, _driver.Used(Tx, 0).Len);
        Assert.Equal(1, _console.BadChains);
        Assert.Equal("", Output);
    }

    [Fact]
    public void Transmit_StreamFailureIsCountedNotThrown()
    {
        var console = new VirtioConsole(new BrokenStream(), queueSize: 16);
        Assert.True(console.Activate(_memory, console.DeviceFeatures, _driver.Queues, _irq));
        _driver.AddChain(Tx, (Buf, 8, false));
        console.QueueNotify(Tx);
        Assert.Equal(1, _driver.UsedIdx(Tx));
        Assert.Equal(1, console.OutputErrors);
    }

    [Fact]
    public void EmergencyWrite_GoesToTheStream()
    {
        _console.WriteConfig(8, [(byte)'!', 0, 0, 0]);
        _console.WriteConfig(0, [(byte)'x', 0]); // cols: read-only
        Assert.Equal("!", Output);
    }

    [Fact]
    public void Input_WaitsForReceiveBuffers_ThenIsDelivered()
    {
        Assert.Equal(5, _console.EnqueueInput("early"u8)); // before the driver is up: buffered
        Activate();
        Assert.Equal(4, _console.EnqueueInput("abcd"u8));
        Assert.Equal(9, _console.PendingInput);
        Assert.Equal(0, _driver.UsedIdx(Rx));

        ushort head = _driver.AddChain(Rx, (Buf, 4, true), (Buf + 0x100, 2, true));
        _console.QueueNotify(Rx);
        Assert.Equal((head, 6u), _driver.Used(Rx, 0));
        Assert.Equal("earl", Encoding.ASCII.GetString(Read(Buf, 4)));
        Assert.Equal("ya", Encoding.ASCII.GetString(Read(Buf + 0x100, 2)));
        Assert.Equal(3, _console.PendingInput);
        Assert.Equal(1, _irq.QueueSignals);
        Assert.Equal(Rx, _irq.LastQueue);

        // Buffers already posted: input goes straight through.
        _driver.AddChain(Rx, (Buf + 0x200, 64, true));
        _driver.AddChain(Rx, (Buf + 0x300, 64, true));
        _console.QueueNotify(Rx);
        Assert.Equal(2, _driver.UsedIdx(Rx));
        Assert.Equal(3u, _driver.Used(Rx, 1).Len);
        Assert.Equal("bcd", Encoding.ASCII.GetString(Read(Buf + 0x200, 3)));
        _console.EnqueueInput("Z"u8);
        Assert.Equal(3, _driver.UsedIdx(Rx));
        Assert.Equal(1u, _driver.Used(Rx, 2).Len);
        Assert.Equal((byte)'Z', Read(Buf + 0x300, 1)[0]);
        Assert.Equal(0, _console.PendingInput);
        Assert.Equal(10, _console.BytesIn);
    }

    [Fact]
    public void Input_IsBounded_AndWrapsAroundTheBuffer()
    {
        var big = new byte[VirtioConsole.InputBufferSize + 1100];
        for (int i = 0; i < big.Length; i++)
            big[i] = (byte)i;
        Assert.Equal(VirtioConsole.InputBufferSize, _console.EnqueueInput(big));
        Assert.Equal(0, _console.EnqueueInput(big));
        Activate();
        _driver.AddChain(Rx, (Buf, 1000, true));
        _console.QueueNotify(Rx);
        Assert.Equal(big.AsSpan(0, 1000).ToArray(), Read(Buf, 1000));
        // Refill past the end of the ring buffer, then drain all of it.
        Assert.Equal(1000, _console.EnqueueInput(big.AsSpan(4096, 100 + 900)));
        _driver.AddChain(Rx, (Buf + 0x1000, 8192, true));
        _console.QueueNotify(Rx);
        Assert.Equal((uint)VirtioConsole.InputBufferSize, _driver.Used(Rx, 1).Len);
        byte[] expected = [.. big.AsSpan(1000, 3096), .. big.AsSpan(4096, 1000)];
        Assert.Equal(expected, Read(Buf + 0x1000, VirtioConsole.InputBufferSize));
    }

    [Fact]
    public void Input_FromManyThreads_ArrivesWhole()
    {
        Activate();
        for (int i = 0; i < 15; i++)
            _driver.AddChain(Rx, (Buf + 0x1000UL * (ulong)i, 0x1000, true));
        var threads = new Thread[4];
        for (int t = 0; t < threads.Length; t++)
        {
            byte tag = (byte)('a' + t);
            threads[t] = new Thread(() =>
            {
                for (int i = 0; i < 200; i++)
                    Assert.Equal(1, _console.EnqueueInput([tag]));
            });
            threads[t].Start();
        }
        foreach (var t in threads)
            t.Join();
        Assert.Equal(15, _driver.UsedIdx(Rx)); // one byte per buffer while they last
        Assert.Equal(785, _console.PendingInput);
        _driver.AddChain(Rx, (Buf + 0x10000, 0x1000, true));
        _console.QueueNotify(Rx);
        Assert.Equal(800, _console.BytesIn);
        var counts = new int[4];
        for (ushort i = 0; i < 15; i++)
            counts[Read(Buf + 0x1000UL * i, 1)[0] - 'a']++;
        foreach (byte b in Read(Buf + 0x10000, 785))
            counts[b - 'a']++;
        Assert.All(counts, c => Assert.Equal(200, c));
        Assert.Equal(0, _console.PendingInput);
    }

    [Fact]
    public void BrokenReceiveRing_StopsDeliveryUntilReset()
    {
        Activate();
        _memory.Write(new GuestAddress(MultiQueueDriver.Base + 0x1000 + 2), (ushort)100); // rx avail.idx impossible
        _console.EnqueueInput("x"u8);
        Assert.True(_console.Broken);
        _console.Reset();
        Assert.False(_console.Broken);
        Assert.Equal(1, _console.PendingInput); // kept for the next driver
    }

    [Fact]
    public void NotifyBeforeActivation_IsIgnored()
    {
        _driver.AddChain(Tx, (Buf, 8, false));
        _console.QueueNotify(Tx);
        _console.QueueNotify(Rx);
        _console.QueueNotify(7);
        Assert.Equal(0, _driver.UsedIdx(Tx));
        Assert.False(_console.Activate(_memory, _console.DeviceFeatures, [_driver.Queues[0]], _irq));
    }

    [Fact]
    public void Fuzz_RandomChainsOnBothQueues_NeverThrow()
    {
        Activate();
        var rng = new Random(4242);
        var input = new byte[64];
        for (int iter = 0; iter < 1000; iter++)
        {
            int q = rng.Next(2);
            int n = rng.Next(1, 4);
            var buffers = new (ulong, uint, bool)[n];
            for (int i = 0; i < n; i++)
            {
                ulong addr = rng.Next(4) == 0 ? (ulong)rng.NextInt64() : Buf + (ulong)rng.Next(0, 0x10000);
                uint len = rng.Next(4) == 0 ? (uint)rng.Next() : (uint)rng.Next(0, 300);
                buffers[i] = (addr, len, rng.Next(3) == 0 ? q == 1 : q == 0);
            }
            _driver.AddChain(q, buffers);
            _console.QueueNotify(q);
            rng.NextBytes(input);
            _console.EnqueueInput(input.AsSpan(0, rng.Next(input.Length)));
            Assert.False(_console.Broken);
        }
        Assert.True(_console.BytesIn > 0);
        Assert.True(_console.BytesOut > 0);
        Assert.True(_console.BadChains > 0);
    }

    private byte[] Read(ulong at, int length)
    {
        var b = new byte[length];
        _memory.Read(new GuestAddress(at), b);
        return b;
    }

    private sealed class BrokenStream : Stream
    {
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => 0;
        public override long Position { get => 0; set { } }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new IOException("pipe closed");
    }
}
