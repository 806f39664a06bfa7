using KvmSharp.Interop;
using Microsoft.Win32.SafeHandles;

namespace KvmSharp.Images;

/// <summary>A raw image: the virtual disk is the file. Positioned I/O (pread/pwrite, preadv/pwritev), so no
/// in-process lock is needed; other processes are kept out by QEMU's file locks (<see cref="ImageLock"/>).</summary>
public sealed class RawImage : IBlockDevice
{
    private readonly SafeFileHandle _file;
    private readonly string _path;
    private ulong _size;

    public ulong Size => _size;
    public bool ReadOnly { get; }
    public string Path => _path;

    /// <summary>Takes ownership of <paramref name="file"/> (and of the locks held on it).</summary>
    internal RawImage(SafeFileHandle file, string path, bool readOnly)
    {
        _file = file;
        _path = path;
        ReadOnly = readOnly;
        _size = (ulong)ImageFile.Length(file, path);
    }

    /// <summary>Opens a raw image with QEMU's locks for a reader or a writer (<see cref="ImageLock"/>).</summary>
    /// <exception cref="ImageException">Io when the file cannot be opened; InvalidArgument when it is not
    /// a regular file or block device; InUse when another process's use conflicts.</exception>
    public static RawImage Open(string path, bool readOnly, bool forceShare = false)
    {
        var h = ImageFile.OpenLocked(path, !readOnly, forceShare, out _);
        try
        {
            return new RawImage(h, path, readOnly);
        }
        catch
        {
            h.Dispose();
            throw;
        }
    }

    /// <summary>The largest raw image: QEMU's BDRV_MAX_LENGTH (INT64_MAX aligned down to 1 GiB, the
    /// largest request), so every byte offset of the disk fits a signed 64-bit file offset.</summary>
    public const ulong MaxSize = 0x7FFF_FFFF_C000_0000UL;

    /// <summary>Creates (or empties) a raw image of <paramref name="size"/> bytes, sparse. An existing
    /// file is emptied only after QEMU's write lock is taken (<see cref="ImageFile.Create"/>).</summary>
    /// <exception cref="ImageException">InvalidArgument when <paramref name="size"/> is above <see cref="MaxSize"/>; InUse; Io.</exception>
    public static void Create(string path, ulong size)
    {
        if (size > MaxSize) ThrowHelper.Throw(ImageErrorKind.InvalidArgument, path, "The image size is too large for file format 'raw'");
        using var h = ImageFile.Create(path);
        try
        {
            RandomAccess.SetLength(h, (long)size);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ImageException(ImageErrorKind.Io, path, $"cannot create: {e.Message}", -1, e);
        }
    }

    private void CheckRange(ulong offset, ulong length)
    {
        ulong end = offset + length;
        if (end < offset || end > _size)
            ThrowHelper.Throw(ImageErrorKind.OutOfBounds, _path, $"request {offset}+{length} beyond disk size {_size}", (long)Math.Min(offset, long.MaxValue));
    }

    public int Read(Span<byte> buffer, ulong offset)
    {
        CheckRange(offset, (ulong)buffer.Length);
        int done = 0;
        try
        {
            while (done < buffer.Length)
            {
                int n = RandomAccess.Read(_file, buffer[done..], (long)offset + done);
                if (n <= 0) { buffer[done..].Clear(); break; } // file shrank underneath us: zeros, as a hole
                done += n;
            }
        }
        catch (IOException e) { ThrowHelper.Io(_path, "read", e, (long)offset); }
        return buffer.Length;
    }

    public void Write(ReadOnlySpan<byte> data, ulong offset)
    {
        if (ReadOnly) ThrowHelper.Throw(ImageErrorKind.ReadOnly, _path, "image is read-only");
        CheckRange(offset, (ulong)data.Length);
        try { RandomAccess.Write(_file, data, (long)offset); }
        catch (IOException e) { ThrowHelper.Io(_path, "write", e, (long)offset); }
    }

    /// <inheritdoc/>
    /// <remarks>preadv(2), repeated after short reads; past the end of a file that shrank underneath
    /// us the rest reads as zeros, as <see cref="Read"/> does.</remarks>
    public void ReadScattered(ReadOnlySpan<NativeBuffer> buffers, ulong offset) => Transfer(buffers, offset, write: false);

    /// <inheritdoc/>
    /// <remarks>pwritev(2), repeated after short writes.</remarks>
    public void WriteGathered(ReadOnlySpan<NativeBuffer> buffers, ulong offset)
    {
        if (ReadOnly) ThrowHelper.Throw(ImageErrorKind.ReadOnly, _path, "image is read-only");
        Transfer(buffers, offset, write: true);
    }

    private void Transfer(ReadOnlySpan<NativeBuffer> buffers, ulong offset, bool write)
    {
        ulong total = 0;
        foreach (NativeBuffer b in buffers)
            total += (ulong)b.Length;
        CheckRange(offset, total);
        // A private copy: a short transfer moves the start of the first unfinished buffer.
        Span<NativeBuffer> left = buffers.Length <= Libc.IOV_MAX ? stackalloc NativeBuffer[buffers.Length] : new NativeBuffer[buffers.Length];
        buffers.CopyTo(left);
        int fd = (int)_file.DangerousGetHandle();
        while (!left.IsEmpty)
        {
            if (left[0].Length == 0)
            {
                left = left[1..];
                continue;
            }
            var batch = left[..Math.Min(left.Length, Libc.IOV_MAX)];
            nint n = write ? Libc.PWriteV(fd, batch, (long)offset) : Libc.PReadV(fd, batch, (long)offset); // EINTR retried there
            if (n < 0)
                ThrowHelper.Throw(ImageErrorKind.Io, _path, $"{(write ? "pwritev" : "preadv")} failed: errno {-n}", (long)offset);
            if (n == 0)
            {
                if (write)
                    ThrowHelper.Throw(ImageErrorKind.Io, _path, "pwritev wrote nothing", (long)offset);
                foreach (NativeBuffer b in left)
                    b.Span.Clear(); // the file shrank underneath us: zeros, as a hole
                return;
            }
            offset += (ulong)n;
            while (n > 0 && !left.IsEmpty && n >= left[0].Length)
            {
                n -= left[0].Length;
                left = left[1..];
            }
            if (n > 0)
                left[0] = left[0].Skip((int)n);
        }
    }

    public void Flush()
    {
        if (ReadOnly) return;
        try { RandomAccess.FlushToDisk(_file); }
        catch (IOException e) { ThrowHelper.Io(_path, "fsync", e); }
    }

    public void Discard(ulong offset, ulong length) => WriteZeroes(offset, length);

    public void WriteZeroes(ulong offset, ulong length)
    {
        if (ReadOnly) ThrowHelper.Throw(ImageErrorKind.ReadOnly, _path, "image is read-only");
        CheckRange(offset, length);
        ReadOnlySpan<byte> zero = ZeroBuffer.Span;
        while (length > 0)
        {
            int n = (int)Math.Min(length, (ulong)zero.Length);
            Write(zero[..n], offset);
            offset += (ulong)n;
            length -= (ulong)n;
        }
    }

    /// <summary>Grows or shrinks the file (resize).</summary>
    public void Resize(ulong newSize)
    {
        if (ReadOnly) ThrowHelper.Throw(ImageErrorKind.ReadOnly, _path, "image is read-only");
        if (newSize > MaxSize) ThrowHelper.Throw(ImageErrorKind.InvalidArgument, _path, "The image size is too large for file format 'raw'");
        try { RandomAccess.SetLength(_file, (long)newSize); }
        catch (IOException e) { ThrowHelper.Io(_path, "resize", e); }
        _size = newSize;
    }

    /// <inheritdoc/>
    /// <remarks>Trivial: the whole file is data at its own offset (holes are not looked up).</remarks>
    public BlockExtent GetBlockStatus(ulong offset, ulong maxLength)
    {
        if (offset >= _size || maxLength == 0)
            ThrowHelper.Throw(ImageErrorKind.OutOfBounds, _path, $"block status at {offset} beyond disk size {_size}", (long)Math.Min(offset, long.MaxValue));
        return new BlockExtent(BlockState.Data, Math.Min(maxLength, _size - offset), offset);
    }

    /// <summary>Bytes actually allocated on the host (st_blocks*512) when known.</summary>
    public long FileLength => RandomAccess.GetLength(_file);

    public void Dispose() => _file.Dispose();
}

internal static class ZeroBuffer
{
    private static readonly byte[] s_zero = new byte[2 * 1024 * 1024];
    public static ReadOnlySpan<byte> Span => s_zero;
}
