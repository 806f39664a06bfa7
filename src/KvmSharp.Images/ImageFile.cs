using System.Buffers.Binary;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace KvmSharp.Images;

/// <summary>
/// Opening and identifying image files. Images are regular files or block devices only (QEMU's
/// "file" and "host_device" drivers): a FIFO, socket, directory or character device is refused with
/// one line before anything reads it, since image code seeks and reads at offsets.
/// </summary>
internal static unsafe partial class ImageFile
{
    // sys/stat.h S_IFMT and the two types images may have.
    private const int S_IFMT = 0xF000, S_IFREG = 0x8000, S_IFBLK = 0x6000;
    private const int AT_FDCWD = -100, AT_EMPTY_PATH = 0x1000;
    private const uint STATX_BASIC_STATS = 0x7ff;

    private readonly record struct Stat(int Mode, FileId Id);

    // statx(2) rather than stat(2): struct statx has one layout on every architecture.
    [LibraryImport("libc", EntryPoint = "statx", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int statx(int dirfd, string path, int flags, uint mask, byte* buf);

    [LibraryImport("libc", EntryPoint = "lseek", SetLastError = true)]
    private static partial long lseek(int fd, long offset, int whence);

    private static bool TryStat(int dirfd, string path, int flags, out Stat st)
    {
        // struct statx (linux/stat.h): stx_mode u16 at 28, stx_ino u64 at 32, stx_dev_major/minor u32 at 136/140; 256 bytes.
        byte* b = stackalloc byte[256];
        // SAFETY: b holds the 256 bytes of struct statx; statx writes only within it.
        if (statx(dirfd, path, flags, STATX_BASIC_STATS, b) != 0)
        {
            st = default;
            return false;
        }
        var s = new ReadOnlySpan<byte>(b, 256);
        ulong dev = ((ulong)BinaryPrimitives.ReadUInt32LittleEndian(s[136..]) << 32) | BinaryPrimitives.ReadUInt32LittleEndian(s[140..]);
        st = new Stat(BinaryPrimitives.ReadUInt16LittleEndian(s[28..]), new FileId(dev, BinaryPrimitives.ReadUInt64LittleEndian(s[32..])));
        return true;
    }

    private static Stat FStat(SafeFileHandle h, string path)
    {
        bool added = false;
        try
        {
            h.DangerousAddRef(ref added);
            if (!TryStat((int)h.DangerousGetHandle(), "", AT_EMPTY_PATH, out var st))
                throw new ImageException(ImageErrorKind.Io, path, $"fstat failed: errno {Marshal.GetLastPInvokeError()}");
            return st;
        }
        finally
        {
            if (added) h.DangerousRelease();
        }
    }

    /// <summary>The identity of the file <paramref name="path"/> names (symbolic links followed), or
    /// null when there is no such file.</summary>
    public static FileId? Identify(string path) => TryStat(AT_FDCWD, path, 0, out var st) ? st.Id : null;

    /// <summary>The identity of an open file.</summary>
    public static FileId Identify(SafeFileHandle h, string path) => FStat(h, path).Id;

    private static void CheckType(string path, int mode)
    {
        int t = mode & S_IFMT;
        if (t is S_IFREG or S_IFBLK) return;
        string what = t switch
        {
            0x1000 => "a FIFO",
            0x2000 => "a character device",
            0x4000 => "a directory",
            0xC000 => "a socket",
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
        if (TryStat(AT_FDCWD, path, 0, out var st))
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
        if (TryStat(AT_FDCWD, path, 0, out var st))
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
            if ((st.Mode & S_IFMT) == S_IFREG)
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
        if ((FStat(h, path).Mode & S_IFMT) != S_IFBLK)
            return RandomAccess.GetLength(h);
        bool added = false;
        try
        {
            h.DangerousAddRef(ref added);
            // pread/pwrite take offsets, so moving this descriptor's file position is harmless.
            long n = lseek((int)h.DangerousGetHandle(), 0, 2 /* SEEK_END */);
            if (n < 0) throw new ImageException(ImageErrorKind.Io, path, $"cannot size block device: errno {Marshal.GetLastPInvokeError()}");
            return n;
        }
        finally
        {
            if (added) h.DangerousRelease();
        }
    }
}
