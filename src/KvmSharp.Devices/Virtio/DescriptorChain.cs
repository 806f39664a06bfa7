using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>One guest buffer of a descriptor chain, copied out of the descriptor table once.</summary>
/// <param name="Address">Guest-physical start; [Address, Address + Length) was checked to be RAM.</param>
/// <param name="Length">Length in bytes; never 0 (empty descriptors are skipped).</param>
public readonly record struct ChainSegment(GuestAddress Address, uint Length);

/// <summary>
/// A descriptor chain popped from a <see cref="VirtQueue"/>: its head index (to return through the
/// used ring) and its buffers, device-readable ones first, then device-writable ones (virtio 1.2
/// §2.7.4.2). A reusable buffer: a device keeps one (or a pool) per queue and
/// <see cref="VirtQueue.TryPop"/> refills it, so popping allocates nothing.
/// </summary>
/// <remarks>Descriptor fields are read from guest memory exactly once, into this object; a driver
/// that rewrites the table afterwards cannot change what the device validated (style.md §5).</remarks>
public sealed class DescriptorChain
{
    private readonly ChainSegment[] _segments;
    private int _count;
    private int _readableCount;

    /// <summary>Creates a buffer for chains of up to <paramref name="capacity"/> descriptors;
    /// <see cref="VirtQueue.MaxSize"/> always suffices, since a chain is never longer than the
    /// queue (virtio 1.2 §2.7.5.3.1).</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="capacity"/> is not positive.</exception>
    public DescriptorChain(int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(capacity);
        _segments = new ChainSegment[capacity];
    }

    /// <summary>Maximum number of non-empty descriptors this buffer holds.</summary>
    public int Capacity => _segments.Length;

    /// <summary>Descriptor index of the chain's head: the id to put in the used ring.</summary>
    public ushort Head { get; private set; }

    /// <summary>Device-readable buffers, in chain order.</summary>
    public ReadOnlySpan<ChainSegment> Readable => _segments.AsSpan(0, _readableCount);

    /// <summary>Device-writable buffers, in chain order.</summary>
    public ReadOnlySpan<ChainSegment> Writable => _segments.AsSpan(_readableCount, _count - _readableCount);

    /// <summary>Total bytes of the readable buffers.</summary>
    public uint ReadableLength { get; private set; }

    /// <summary>Total bytes of the writable buffers.</summary>
    public uint WritableLength { get; private set; }

    internal void Reset(ushort head)
    {
        Head = head;
        _count = 0;
        _readableCount = 0;
        ReadableLength = 0;
        WritableLength = 0;
    }

    /// <returns>False when the buffer is full or the total length would reach 2^32.</returns>
    internal bool TryAdd(GuestAddress address, uint length, bool writable)
    {
        if (_count == _segments.Length)
            return false;
        // virtio-queue chain.rs: the total length of a chain stays below 2^32.
        if ((ulong)ReadableLength + WritableLength + length > uint.MaxValue)
            return false;
        _segments[_count++] = new ChainSegment(address, length);
        if (writable)
        {
            WritableLength += length;
        }
        else
        {
            _readableCount++;
            ReadableLength += length;
        }
        return true;
    }

    internal bool HasWritable => _count != _readableCount;
}
