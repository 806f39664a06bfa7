using Microsoft.Win32.SafeHandles;

namespace KvmSharp.Images;

/// <summary>A raw image: the virtual disk is the file. Positioned I/O (pread/pwrite), so no lock is needed.</summary>
public sealed class RawImage : IBlockDevice
{
    private readonly SafeFileHandle _file;
    private readonly string _path;
    private ulong _size;

    public ulong Size => _size;
    public bool ReadOnly { get; }
    public string Path => _path;

    private RawImage(SafeFileHandle file, string path, bool readOnly)
    {
        _file = file;
        _path = path;
        ReadOnly = readOnly;
        _size = (ulong)RandomAccess.GetLength(file);
    }

    /// <exception cref="ImageException">Io when the file cannot be opened.</exception>
    public static RawImage Open(string path, bool readOnly)
    {
        try
        {
            var h = File.OpenHandle(path, FileMode.Open, readOnly ? FileAccess.Read : FileAccess.ReadWrite,
                readOnly ? FileShare.ReadWrite : FileShare.Read);
            return new RawImage(h, path, readOnly);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ImageException(ImageErrorKind.Io, path, $"cannot open: {e.Message}", -1, e);
        }
    }

    /// <summary>Creates (or truncates) a raw image of <paramref name="size"/> bytes, sparse.</summary>
    public static void Create(string path, ulong size)
    {
        if (size > long.MaxValue) ThrowHelper.Throw(ImageErrorKind.InvalidArgument, path, "size too large");
        try
        {
            using var h = File.OpenHandle(path, FileMode.Create, FileAccess.ReadWrite);
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
        if (newSize > long.MaxValue) ThrowHelper.Throw(ImageErrorKind.InvalidArgument, _path, "size too large");
        RandomAccess.SetLength(_file, (long)newSize);
        _size = newSize;
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
