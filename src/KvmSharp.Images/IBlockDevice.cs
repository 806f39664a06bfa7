using KvmSharp.Interop;

namespace KvmSharp.Images;

/// <summary>
/// A disk back end addressed in bytes. Implementations are thread-safe and do not allocate per call
/// (compressed qcow2 clusters excepted; see README).
/// </summary>
public interface IBlockDevice : IDisposable
{
    /// <summary>Virtual disk size in bytes.</summary>
    ulong Size { get; }

    /// <summary>True when <see cref="Write"/>, <see cref="Discard"/> and <see cref="WriteZeroes"/> throw.</summary>
    bool ReadOnly { get; }

    /// <summary>Reads <c>buffer.Length</c> bytes at <paramref name="offset"/>; returns the count read (always the full length).</summary>
    /// <exception cref="ImageException">OutOfBounds when the range leaves the disk; Corrupt or Io otherwise.</exception>
    int Read(Span<byte> buffer, ulong offset);

    /// <summary>Writes <paramref name="data"/> at <paramref name="offset"/>. Durable only after <see cref="Flush"/>.</summary>
    /// <exception cref="ImageException">ReadOnly, OutOfBounds, Corrupt or Io.</exception>
    void Write(ReadOnlySpan<byte> data, ulong offset);

    /// <summary>Makes every completed write durable (metadata written in crash-safe order, then fsync).</summary>
    void Flush();

    /// <summary>Drops the range's data where possible; afterwards the range reads as zeros.</summary>
    void Discard(ulong offset, ulong length);

    /// <summary>Makes the range read as zeros, without writing data where the format allows.</summary>
    void WriteZeroes(ulong offset, ulong length);

    /// <summary>
    /// What this layer holds from <paramref name="offset"/> on, and how far that extends (at most
    /// <paramref name="maxLength"/> bytes, never past <see cref="Size"/>). Callers walk an image extent by
    /// extent, so a run of unallocated or zero clusters costs one call, not one per cluster: the time of
    /// map, compare, convert and commit follows the image's metadata, not its virtual size.
    /// </summary>
    /// <exception cref="ImageException">OutOfBounds when <paramref name="offset"/> is not below <see cref="Size"/>
    /// or <paramref name="maxLength"/> is 0; Corrupt when the metadata describing the range is invalid.</exception>
    BlockExtent GetBlockStatus(ulong offset, ulong maxLength)
    {
        if (offset >= Size || maxLength == 0)
            ThrowHelper.Throw(ImageErrorKind.OutOfBounds, null, $"block status at {offset} beyond disk size {Size}", (long)Math.Min(offset, long.MaxValue));
        return new BlockExtent(BlockState.Data, Math.Min(maxLength, Size - offset));
    }

    /// <summary>
    /// Reads consecutive bytes from <paramref name="offset"/> into each buffer in turn (a virtio-blk
    /// request's scattered guest pages). Formats that can do it in one system call override this.
    /// </summary>
    /// <exception cref="ImageException">As <see cref="Read"/>.</exception>
    void ReadScattered(ReadOnlySpan<NativeBuffer> buffers, ulong offset)
    {
        foreach (NativeBuffer b in buffers)
        {
            Read(b.Span, offset);
            offset += (ulong)b.Length;
        }
    }

    /// <summary>Writes each buffer in turn to consecutive bytes from <paramref name="offset"/>.</summary>
    /// <exception cref="ImageException">As <see cref="Write"/>.</exception>
    void WriteGathered(ReadOnlySpan<NativeBuffer> buffers, ulong offset)
    {
        foreach (NativeBuffer b in buffers)
        {
            Write(b.Span, offset);
            offset += (ulong)b.Length;
        }
    }
}
