using KvmSharp.Interop;
using Microsoft.Win32.SafeHandles;

namespace KvmSharp.Images;

/// <summary>
/// Opening and identifying image files. Images are regular files or block devices only (QEMU's
/// "file" and "host_device" drivers): a FIFO, socket, directory or character device is refused with
/// one line before anything reads it, since image code seeks and reads at offsets.
/// </summary>
internal static class ImageFile
{
    private readonly record struct Stat(int Mode, FileId Id);

    // statx(2) rather than stat(2): struct statx has one layout on every architecture.
    private static bool TryStat(int dirfd, string path, int flags, out Stat st)
    {
        if (!Libc.TryStatx(dirfd, path, flags, out Libc.Statx sx))
        {
            st = default;
            return false;
        }
        ulong dev = ((ulong)sx.stx_dev_major << 32) | sx.stx_dev_minor;
        st = new Stat(sx.stx_mode, new FileId(dev, sx.stx_ino));
        return true;
    }

    private static Stat FStat(SafeFileHandle h, string path)
    {
        bool added = false;
        try
        {
            h.DangerousAddRef(ref added);
            if (!TryStat((int)h.DangerousGetHandle(), "", Libc.AT_EMPTY_PATH, out var st))
                throw new ImageException(ImageErrorKind.Io, path, $"fstat failed: errno {Libc.LastErrno}");
            return st;
        }
        finally
        {
            if (added) h.DangerousRelease();
        }
    }

    /// <summary>The identity of the file <paramref name="path"/> names (symbolic links followed), or
    /// null when there is no such file.</summary>
    public static FileId? Identify(string path) => TryStat(Libc.AT_FDCWD, path, 0, out var st) ? st.Id : null;

    /// <summary>The identity of an open file.</summary>
    public static FileId Identify(SafeFileHandle h, string path) => FStat(h, path).Id;

    private static void CheckType(string path, int mode)
    {
        int t = mode & Libc.S_IFMT;
        if (t is Libc.S_IFREG or Libc.S_IFBLK) return;
        string what = t switch
        {
            Libc.S_IFIFO => "a FIFO",
            Libc.S_IFCHR => "a character device",
            Libc.S_IFDIR => "a directory",
            Libc.S_IFSOCK => "a socket",
            _ => "not a file",
        };
        throw new ImageException(ImageErrorKind.InvalidArgument, path, $"not a regular file or block device ({what})");
    }

    /// <summary>
    /// Opens an existing image file. The name is checked before the open (opening a FIFO blocks until
    /// a writer comes) and the open file again after it (the name may have changed in between).
    /// No lock is taken: see <see cref="ImageLock.Acquire"/>.
    /// </summary>
    /// <exception cref="ImageException">InvalidArgument for a file of the wrong type; Io when it cannot be opened.</exception>
    public static SafeFileHandle Open(string path, bool writable, out FileId id)
    {
        if (TryStat(Libc.AT_FDCWD, path, 0, out var st))
            CheckType(path, st.Mode);
        SafeFileHandle h;
        try
        {
            // FileShare only steers .NET's advisory flock; sharing is QEMU's byte locks (ImageLock).
            h = File.OpenHandle(path, FileMode.Open, writable ? FileAccess.ReadWrite : FileAccess.Read, FileShare.ReadWrite);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ImageException(ImageErrorKind.Io, path, $"cannot open: {e.Message}", -1, e);
        }
        try
        {
            st = FStat(h, path);
            CheckType(path, st.Mode);
            id = st.Id;
            return h;
        }
        catch
        {
            h.Dispose();
            throw;
        }
    }

    /// <summary>Opens an image file and takes QEMU's locks for a reader, a writer, or (force share,
    /// qemu-img -U) a reader that lets everyone else write.</summary>
    public static SafeFileHandle OpenLocked(string path, bool writable, bool forceShare, out FileId id)
    {
        var h = Open(path, writable, out id);
        try
        {
            Lock(h, path, writable, forceShare);
            return h;
        }
        catch
        {
            h.Dispose();
            throw;
        }
    }

    public static void Lock(SafeFileHandle h, string path, bool writable, bool forceShare)
    {
        if (writable) ImageLock.Acquire(h, path, ImageLock.WriterPerm, ImageLock.WriterShared);
        else if (forceShare) ImageLock.Acquire(h, path, BlockPermissions.ConsistentRead, BlockPermissions.All);
        else ImageLock.Acquire(h, path, ImageLock.ReaderPerm, ImageLock.ReaderShared);
    }

    /// <summary>
    /// Creates <paramref name="path"/>, or empties it when it exists, as QEMU's raw_co_create does: open
    /// without truncating, take the write and resize locks, and truncate only once nobody else uses
    /// the file, so creating over an image in use (a running VM's disk, the source of a convert) is
    /// refused with the file intact.
    /// </summary>
    /// <exception cref="ImageException">InUse, InvalidArgument (wrong file type) or Io.</exception>
    public static SafeFileHandle Create(string path)
    {
        if (TryStat(Libc.AT_FDCWD, path, 0, out var st))
            CheckType(path, st.Mode);
        SafeFileHandle h;
        try
        {
            h = File.OpenHandle(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.ReadWrite);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ImageException(ImageErrorKind.Io, path, $"cannot create: {e.Message}", -1, e);
        }
        try
        {
            st = FStat(h, path);
            CheckType(path, st.Mode);
            ImageLock.Acquire(h, path, BlockPermissions.Write | BlockPermissions.Resize, BlockPermissions.All & ~BlockPermissions.Resize);
            if ((st.Mode & Libc.S_IFMT) == Libc.S_IFREG)
                RandomAccess.SetLength(h, 0);
            return h;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            h.Dispose();
            throw new ImageException(ImageErrorKind.Io, path, $"cannot create: {e.Message}", -1, e);
        }
        catch
        {
            h.Dispose();
            throw;
        }
    }

    /// <summary>Size in bytes: st_size for a file, the device size for a block device (st_size is 0 there).</summary>
    public static long Length(SafeFileHandle h, string path)
    {
        if ((FStat(h, path).Mode & Libc.S_IFMT) != Libc.S_IFBLK)
            return RandomAccess.GetLength(h);
        bool added = false;
        try
        {
            h.DangerousAddRef(ref added);
            // pread/pwrite take offsets, so moving this descriptor's file position is harmless.
            long n = Libc.lseek((int)h.DangerousGetHandle(), 0, Libc.SEEK_END);
            if (n < 0) throw new ImageException(ImageErrorKind.Io, path, $"cannot size block device: errno {Libc.LastErrno}");
            return n;
        }
        finally
        {
            if (added) h.DangerousRelease();
        }
    }
}
