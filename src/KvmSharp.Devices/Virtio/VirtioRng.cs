using System.Security.Cryptography;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>
/// virtio entropy device (virtio 1.2 §5.4): one request queue; the device fills each
/// device-writable buffer with random bytes from the host's CSPRNG.
/// </summary>
/// <remarks>
/// <para>Work per request is bounded by <see cref="MaxBytesPerRequest"/> (§5.4.6.1: the device
/// MAY use less than the whole buffer), so <see cref="QueueNotify"/> (the I/O thread) serves the
/// queue at once.</para>
/// <para>Malformed chains are returned with length 0 and counted; an impossible ring stops the
/// device until reset (<see cref="Broken"/>).</para>
/// <para>Threads: <see cref="ProcessQueue"/>, <see cref="Activate"/> and <see cref="Reset"/>
/// serialise on one lock; the interrupt is signalled under it (it never blocks).</para>
/// </remarks>
public sealed class VirtioRng : IVirtioDevice
{
    /// <summary>Upper bound of random bytes returned per request.</summary>
    public const int MaxBytesPerRequest = 64 * 1024;

    private readonly ushort _queueSize;
    private readonly DescriptorChain _chain;
    private readonly byte[] _scratch = new byte[4096];
    private readonly VirtioDeviceCore _core; // under _lock
    private readonly ChainHandler _fill;
    private readonly Lock _lock = new();
    private long _bytesServed;

    /// <summary>Creates the device with a request queue of at most <paramref name="queueSize"/> entries.</summary>
    /// <param name="queueSize">Maximum size of the request queue.</param>
    /// <param name="log">Where malformed chains are reported, rate-limited; null for none.</param>
    /// <exception cref="ArgumentOutOfRangeException">The size is not a power of two up to 32768.</exception>
    public VirtioRng(ushort queueSize = 256, RateLimitedLog? log = null)
    {
        VirtQueue.ValidateMaxSize(queueSize);
        _core = new VirtioDeviceCore("virtio-rng", 1, log);
        _queueSize = queueSize;
        _chain = new DescriptorChain(queueSize);
        _fill = Fill;
    }

    /// <inheritdoc/>
    public uint DeviceType => VirtioDeviceType.Entropy;

    /// <inheritdoc/>
    /// <remarks>No device-specific features (§5.4.3).</remarks>
    public ulong DeviceFeatures => VirtioFeatures.VERSION_1 | VirtioFeatures.RING_INDIRECT_DESC | VirtioFeatures.RING_EVENT_IDX;

    /// <inheritdoc/>
    public int QueueCount => 1;

    /// <summary>Malformed chains seen since creation (each logged, rate-limited).</summary>
    public long BadChains => _core.BadChains;

    /// <summary>Random bytes handed to the guest since creation.</summary>
    public long BytesServed => Interlocked.Read(ref _bytesServed);

    /// <summary>True after the driver corrupted the ring; cleared by reset.</summary>
    public bool Broken => _core.Broken;

    /// <inheritdoc/>
    public ushort QueueMaxSize(int index) => _queueSize;

    /// <inheritdoc/>
    /// <remarks>No configuration space (§5.4.4): reads 0.</remarks>
    public void ReadConfig(ulong offset, Span<byte> data) => data.Clear();

    /// <inheritdoc/>
    public void WriteConfig(ulong offset, ReadOnlySpan<byte> data)
    {
    }

    /// <inheritdoc/>
    public bool Activate(GuestMemory memory, ulong negotiatedFeatures, IReadOnlyList<VirtQueue> queues, IVirtioInterrupt interrupt)
    {
        lock (_lock)
            return _core.Activate(memory, negotiatedFeatures, queues, interrupt, requiredQueues: 1); // the request queue is the device's only function
    }

    /// <inheritdoc/>
    public void Reset()
    {
        lock (_lock)
            _core.Reset();
    }

    /// <inheritdoc/>
    public bool QueueNotify(int queueIndex)
    {
        if (queueIndex == 0)
            ProcessQueue();
        return false;
    }

    /// <summary>Serves every available request, then signals the driver if it wants it.</summary>
    public void ProcessQueue()
    {
        lock (_lock)
            _core.Serve(0, _chain, _fill);
    }

    private uint Fill(GuestMemory memory, DescriptorChain chain)
    {
        var writer = new ChainWriter(memory, chain);
        int budget = (int)Math.Min(writer.Remaining, (uint)MaxBytesPerRequest);
        while (budget > 0)
        {
            Span<byte> chunk = _scratch.AsSpan(0, Math.Min(budget, _scratch.Length));
            RandomNumberGenerator.Fill(chunk);
            int n = writer.Write(chunk);
            if (n == 0)
                break;
            budget -= n;
        }
        Interlocked.Add(ref _bytesServed, writer.BytesWritten);
        return writer.BytesWritten;
    }
}
