using System.Runtime.InteropServices;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>
/// Reads the device-readable part of a <see cref="DescriptorChain"/> as one byte stream, across
/// buffer boundaries (crosvm descriptor_utils.rs <c>Reader</c>). A mutable struct: keep it in a
/// local and pass it by <c>ref</c>.
/// </summary>
public struct ChainReader
{
    private readonly GuestMemory _memory;
    private readonly DescriptorChain _chain;
    private int _segment;
    private uint _offset; // into the current segment

    /// <summary>Starts at the first readable byte of <paramref name="chain"/>.</summary>
    public ChainReader(GuestMemory memory, DescriptorChain chain)
    {
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(chain);
        _memory = memory;
        _chain = chain;
        Remaining = chain.ReadableLength;
    }

    /// <summary>Readable bytes not consumed yet.</summary>
    public uint Remaining { get; private set; }

    /// <summary>Copies up to <paramref name="destination"/>.Length bytes.</summary>
    /// <returns>Bytes copied: fewer than requested only at the end of the readable part.</returns>
    public int Read(Span<byte> destination)
    {
        ReadOnlySpan<ChainSegment> segments = _chain.Readable;
        int done = 0;
        while (done < destination.Length && _segment < segments.Length)
        {
            ChainSegment s = segments[_segment];
            int chunk = (int)Math.Min((uint)(destination.Length - done), s.Length - _offset);
            // Ranges were checked when the chain was popped; a failure here means RAM went away.
            if (!_memory.TryRead(new GuestAddress(s.Address.Value + _offset), destination.Slice(done, chunk)))
                break;
            done += chunk;
            Advance((uint)chunk, s.Length);
        }
        return done;
    }

    /// <summary>Reads exactly one <typeparamref name="T"/> (a request header, say), or nothing.</summary>
    /// <returns>False, consuming nothing, when fewer than sizeof(T) bytes remain.</returns>
    public bool TryRead<T>(out T value) where T : unmanaged
    {
        value = default;
        Span<byte> bytes = MemoryMarshal.AsBytes(new Span<T>(ref value));
        if ((uint)bytes.Length > Remaining)
            return false;
        return Read(bytes) == bytes.Length;
    }

    /// <summary>Skips up to <paramref name="count"/> bytes.</summary>
    /// <returns>Bytes skipped.</returns>
    public uint Skip(uint count)
    {
        ReadOnlySpan<ChainSegment> segments = _chain.Readable;
        uint done = 0;
        while (done < count && _segment < segments.Length)
        {
            ChainSegment s = segments[_segment];
            uint chunk = Math.Min(count - done, s.Length - _offset);
            done += chunk;
            Advance(chunk, s.Length);
        }
        return done;
    }

    private void Advance(uint chunk, uint segmentLength)
    {
        Remaining -= chunk;
        _offset += chunk;
        if (_offset == segmentLength)
        {
            _segment++;
            _offset = 0;
        }
    }
}

/// <summary>
/// Writes the device-writable part of a <see cref="DescriptorChain"/> as one byte stream
/// (crosvm descriptor_utils.rs <c>Writer</c>). <see cref="BytesWritten"/> is the length to report
/// in the used ring. A mutable struct: keep it in a local and pass it by <c>ref</c>.
/// </summary>
public struct ChainWriter
{
    private readonly GuestMemory _memory;
    private readonly DescriptorChain _chain;
    private int _segment;
    private uint _offset;

    /// <summary>Starts at the first writable byte of <paramref name="chain"/>.</summary>
    public ChainWriter(GuestMemory memory, DescriptorChain chain)
    {
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(chain);
        _memory = memory;
        _chain = chain;
        Remaining = chain.WritableLength;
    }

    /// <summary>Writable bytes not used yet.</summary>
    public uint Remaining { get; private set; }

    /// <summary>Bytes written so far.</summary>
    public uint BytesWritten { get; private set; }

    /// <summary>Copies up to <paramref name="source"/>.Length bytes into the chain.</summary>
    /// <returns>Bytes copied: fewer than given only when the writable part is full.</returns>
    public int Write(ReadOnlySpan<byte> source)
    {
        ReadOnlySpan<ChainSegment> segments = _chain.Writable;
        int done = 0;
        while (done < source.Length && _segment < segments.Length)
        {
            ChainSegment s = segments[_segment];
            int chunk = (int)Math.Min((uint)(source.Length - done), s.Length - _offset);
            if (!_memory.TryWrite(new GuestAddress(s.Address.Value + _offset), source.Slice(done, chunk)))
                break;
            done += chunk;
            Remaining -= (uint)chunk;
            BytesWritten += (uint)chunk;
            _offset += (uint)chunk;
            if (_offset == s.Length)
            {
                _segment++;
                _offset = 0;
            }
        }
        return done;
    }

    /// <summary>Writes exactly one <typeparamref name="T"/> (a status byte, a response header), or nothing.</summary>
    /// <returns>False, writing nothing, when fewer than sizeof(T) bytes remain.</returns>
    public bool TryWrite<T>(in T value) where T : unmanaged
    {
        ReadOnlySpan<byte> bytes = MemoryMarshal.AsBytes(new ReadOnlySpan<T>(in value));
        if ((uint)bytes.Length > Remaining)
            return false;
        return Write(bytes) == bytes.Length;
    }
}
