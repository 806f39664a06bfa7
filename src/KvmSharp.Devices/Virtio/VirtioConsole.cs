using System.Buffers.Binary;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>Feature bits of the virtio console (virtio 1.2 §5.3.3).</summary>
public static class VirtioConsoleFeatures
{
    public const ulong SIZE = 1UL << 0;
    public const ulong MULTIPORT = 1UL << 1;
    public const ulong EMERG_WRITE = 1UL << 2;
}

/// <summary>
/// virtio console (virtio 1.2 §5.3), port 0 only (no MULTIPORT): receiveq0 carries host input to
/// the driver, transmitq0 carries guest output to a <see cref="Stream"/>. Linux: <c>hvc0</c>
/// (<c>console=hvc0</c>).
/// </summary>
/// <remarks>
/// <para>Output: on a transmitq kick (<see cref="QueueNotify"/>, from the I/O thread) each chain's
/// readable bytes are written to the output stream and flushed; a stream failure drops the
/// output and is counted, never thrown. With VIRTIO_CONSOLE_F_EMERG_WRITE the driver may also
/// write single bytes to the emerg_wr config field (early console).</para>
/// <para>Input: <see cref="EnqueueInput"/> (any thread) copies into a bounded buffer and moves as
/// much as the driver has posted receive buffers for; the rest waits for the next receiveq kick.
/// Bytes are never put into a receive buffer the device cannot fill, so none are lost.</para>
/// <para>Locks: the transmit path and the receive path each have their own lock, so a blocking
/// output stream does not stall input; <see cref="Activate"/> and <see cref="Reset"/> take the
/// transmit lock, then the receive lock. Interrupts are signalled under them (never blocking).</para>
/// </remarks>
public sealed class VirtioConsole : IVirtioDevice
{
    /// <summary>Capacity of the pending-input buffer.</summary>
    public const int InputBufferSize = 4096;

    private const int ReceiveQueue = 0;
    private const int TransmitQueue = 1;
    private const int ConfigSize = 12; // cols, rows, max_nr_ports, emerg_wr (§5.3.4)

    private readonly Stream _output;
    private readonly ushort _queueSize;
    private readonly ushort _cols;
    private readonly ushort _rows;
    private readonly VirtioDeviceCore _core; // written under both locks, read under either

    // Lock order: _txLock, then _rxLock. _txLock guards the transmit queue and _output.
    private readonly Lock _txLock = new();
    private readonly DescriptorChain _txChain;
    private readonly byte[] _txScratch = new byte[4096];
    private readonly ChainHandler _transmit;

    // _rxLock guards the receive queue, the input ring buffer and the shared activation state.
    private readonly Lock _rxLock = new();
    private readonly DescriptorChain _rxChain;
    private readonly byte[] _input = new byte[InputBufferSize];
    private int _inputStart;
    private int _inputCount;

    private long _bytesOut;
    private long _bytesIn;
    private long _outputErrors;

    /// <summary>Creates the console.</summary>
    /// <param name="output">Receives guest output; written and flushed on the I/O thread.</param>
    /// <param name="queueSize">Maximum size of each queue (a power of two up to 32768).</param>
    /// <param name="cols">Columns reported with VIRTIO_CONSOLE_F_SIZE.</param>
    /// <param name="rows">Rows reported with VIRTIO_CONSOLE_F_SIZE.</param>
    /// <param name="log">Where guest-caused errors are reported, rate-limited; null for none.</param>
    /// <exception cref="ArgumentNullException"><paramref name="output"/> is null.</exception>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="queueSize"/> is invalid.</exception>
    public VirtioConsole(Stream output, ushort queueSize = 64, ushort cols = 80, ushort rows = 25, RateLimitedLog? log = null)
    {
        ArgumentNullException.ThrowIfNull(output);
        VirtQueue.ValidateMaxSize(queueSize);
        _output = output;
        _queueSize = queueSize;
        _cols = cols;
        _rows = rows;
        _txChain = new DescriptorChain(queueSize);
        _rxChain = new DescriptorChain(queueSize);
        _core = new VirtioDeviceCore("virtio-console", 2, log);
        _transmit = Transmit;
    }

    /// <inheritdoc/>
    public uint DeviceType => VirtioDeviceType.Console;

    /// <inheritdoc/>
    public ulong DeviceFeatures => VirtioFeatures.VERSION_1 | VirtioFeatures.RING_INDIRECT_DESC | VirtioFeatures.RING_EVENT_IDX
        | VirtioConsoleFeatures.SIZE | VirtioConsoleFeatures.EMERG_WRITE;

    /// <inheritdoc/>
    /// <remarks>receiveq0 and transmitq0 (§5.3.2; no control queues without MULTIPORT).</remarks>
    public int QueueCount => 2;

    /// <summary>Bytes the guest wrote (transmitq and emerg_wr).</summary>
    public long BytesOut => Interlocked.Read(ref _bytesOut);

    /// <summary>Bytes delivered to the guest.</summary>
    public long BytesIn => Interlocked.Read(ref _bytesIn);

    /// <summary>Output writes that failed (the bytes were dropped).</summary>
    public long OutputErrors => Interlocked.Read(ref _outputErrors);

    /// <summary>Malformed chains returned with length 0.</summary>
    public long BadChains => _core.BadChains;

    /// <summary>Input bytes accepted but not yet delivered.</summary>
    public int PendingInput
    {
        get
        {
            lock (_rxLock)
                return _inputCount;
        }
    }

    /// <summary>True after the driver corrupted a ring; cleared by reset.</summary>
    public bool Broken => _core.Broken;

    /// <inheritdoc/>
    public ushort QueueMaxSize(int index) => _queueSize;

    /// <inheritdoc/>
    /// <remarks>struct virtio_console_config (§5.3.4): cols, rows, max_nr_ports (unused without
    /// MULTIPORT), emerg_wr (write-only, reads 0).</remarks>
    public void ReadConfig(ulong offset, Span<byte> data)
    {
        Span<byte> config = stackalloc byte[ConfigSize];
        config.Clear();
        BinaryPrimitives.WriteUInt16LittleEndian(config, _cols);
        BinaryPrimitives.WriteUInt16LittleEndian(config[2..], _rows);
        BinaryPrimitives.WriteUInt32LittleEndian(config[4..], 1);
        VirtioConfigSpace.Read(config, offset, data);
    }

    /// <inheritdoc/>
    /// <remarks>Only emerg_wr (offset 8) is writable: its low byte is output at once (§5.3.4).
    /// Called on a vCPU thread; the output stream is written under the transmit lock.</remarks>
    public void WriteConfig(ulong offset, ReadOnlySpan<byte> data)
    {
        if (offset != 8 || data.IsEmpty)
            return;
        lock (_txLock)
            WriteOutput(data[..1]);
    }

    /// <inheritdoc/>
    public bool Activate(GuestMemory memory, ulong negotiatedFeatures, IReadOnlyList<VirtQueue> queues, IVirtioInterrupt interrupt)
    {
        lock (_txLock)
        {
            lock (_rxLock)
                return _core.Activate(memory, negotiatedFeatures, queues, interrupt, requiredQueues: 2);
        }
    }

    /// <inheritdoc/>
    /// <remarks>Pending input is kept for the next driver.</remarks>
    public void Reset()
    {
        lock (_txLock)
        {
            lock (_rxLock)
                _core.Reset();
        }
    }

    /// <inheritdoc/>
    public bool QueueNotify(int queueIndex)
    {
        if (queueIndex == TransmitQueue)
            ProcessTransmit();
        else if (queueIndex == ReceiveQueue)
            ProcessReceive();
        return false;
    }

    /// <summary>
    /// Accepts host input (keyboard, a socket) for the guest. Thread-safe; never blocks on the
    /// guest. Delivers at once if the driver has posted receive buffers.
    /// </summary>
    /// <returns>Bytes accepted (fewer than given when the <see cref="InputBufferSize"/> buffer is
    /// full): keep the rest and retry later.</returns>
    public int EnqueueInput(ReadOnlySpan<byte> data)
    {
        lock (_rxLock)
        {
            int accepted = Math.Min(data.Length, _input.Length - _inputCount);
            int tail = (_inputStart + _inputCount) % _input.Length;
            int first = Math.Min(accepted, _input.Length - tail);
            data[..first].CopyTo(_input.AsSpan(tail));
            data[first..accepted].CopyTo(_input);
            _inputCount += accepted;
            DeliverLocked();
            return accepted;
        }
    }

    /// <summary>The driver posted receive buffers: deliver pending input.</summary>
    public void ProcessReceive()
    {
        lock (_rxLock)
            DeliverLocked();
    }

    private void DeliverLocked()
    {
        if (!_core.TryGetQueue(ReceiveQueue, out VirtQueue? queue, out GuestMemory? memory, out IVirtioInterrupt? interrupt))
            return;
        bool used = false;
        while (_inputCount > 0)
        {
            PopResult result = queue.TryPop(memory, _rxChain);
            if (result == PopResult.Empty)
            {
                // Ask for a kick when the driver posts the next buffer; re-check for a race.
                if (!queue.EnableNotification(memory))
                    break;
                continue;
            }
            if (result == PopResult.BrokenRing)
            {
                _core.MarkBroken(interrupt, ReceiveQueue);
                break;
            }
            uint written = 0;
            if (result == PopResult.Chain)
            {
                var writer = new ChainWriter(memory, _rxChain);
                while (_inputCount > 0 && writer.Remaining > 0)
                {
                    int run = Math.Min(_inputCount, _input.Length - _inputStart);
                    int n = writer.Write(_input.AsSpan(_inputStart, run));
                    if (n == 0)
                        break;
                    _inputStart = (_inputStart + n) % _input.Length;
                    _inputCount -= n;
                }
                written = writer.BytesWritten;
                Interlocked.Add(ref _bytesIn, written);
                if (_inputCount == 0)
                    _inputStart = 0;
            }
            else
            {
                _core.BadChain(_rxChain.Head);
            }
            if (!queue.TryAddUsed(memory, _rxChain.Head, written))
            {
                _core.MarkBroken(interrupt, ReceiveQueue);
                break;
            }
            used = true;
        }
        if (used && queue.NeedsNotification(memory))
            interrupt.Signal(VirtioInterruptType.Queue, ReceiveQueue);
    }

    /// <summary>Writes every available transmit buffer to the output stream.</summary>
    public void ProcessTransmit()
    {
        lock (_txLock)
            _core.Serve(TransmitQueue, _txChain, _transmit);
    }

    /// <remarks>§5.3.6.2: transmit buffers are returned with nothing written.</remarks>
    private uint Transmit(GuestMemory memory, DescriptorChain chain)
    {
        var reader = new ChainReader(memory, chain);
        int n;
        while ((n = reader.Read(_txScratch)) > 0)
            WriteOutput(_txScratch.AsSpan(0, n));
        return 0;
    }

    private void WriteOutput(ReadOnlySpan<byte> bytes)
    {
        try
        {
            _output.Write(bytes);
            _output.Flush();
            Interlocked.Add(ref _bytesOut, bytes.Length);
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or NotSupportedException)
        {
            Interlocked.Increment(ref _outputErrors);
        }
    }
}
