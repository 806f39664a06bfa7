using KvmSharp.Interop;
using Microsoft.Win32.SafeHandles;

namespace KvmSharp.Images;

/// <summary>
/// QEMU's block permissions (include/block/block-common.h, <c>BlockPermission</c>): bit i is lock
/// byte 100+i ("I use it") and 200+i ("I do not let others use it") in <see cref="ImageLock"/>.
/// </summary>
[Flags]
public enum BlockPermissions
{
    None = 0,
    ConsistentRead = 1 << 0,
    Write = 1 << 1,
    WriteUnchanged = 1 << 2,
    Resize = 1 << 3,
    All = ConsistentRead | Write | WriteUnchanged | Resize,
}

/// <summary>Device and inode of an open file: the identity of an image, whatever name reached it.</summary>
public readonly record struct FileId(ulong Device, ulong Inode);

/// <summary>
/// Opens image files the way QEMU's file-posix driver does: only regular files and block devices,
/// and with QEMU's byte-range lock protocol, so that KvmSharp, qemu-img and QEMU see each other's users.
/// <para>The protocol (block/file-posix.c, <c>raw_apply_lock_bytes</c>/<c>raw_check_lock_bytes</c>):
/// an opener takes a shared (F_RDLCK) open-file-description lock on byte 100+i for each permission i
/// it uses and on byte 200+i for each permission it does not share; then it tests (F_OFD_GETLK with
/// F_WRLCK) that no other open file holds byte 200+i for a permission it uses nor byte 100+i for one it
/// does not share. OFD locks belong to the open file description, not the process: two opens in one
/// process conflict like two processes, and the locks go away when the file is closed (or the process
/// dies), so disposing an image releases them without any unlock call.</para>
/// </summary>
public static class ImageLock
{
    private const int RawLockPermBase = 100;   // file-posix.c RAW_LOCK_PERM_BASE
    private const int RawLockSharedBase = 200; // file-posix.c RAW_LOCK_SHARED_BASE

    /// <summary>A writer (guest disk, img write commands): reads, writes and may grow the file; like a
    /// qcow2 node in QEMU it lets nobody else write or resize underneath it.</summary>
    public const BlockPermissions WriterPerm = BlockPermissions.ConsistentRead | BlockPermissions.Write | BlockPermissions.Resize;
    public const BlockPermissions WriterShared = BlockPermissions.ConsistentRead | BlockPermissions.WriteUnchanged;

    /// <summary>A reader (read-only disk, backing file, img read commands): QEMU's format drivers
    /// unshare write and resize on the files they read (metadata must not change underneath).</summary>
    public const BlockPermissions ReaderPerm = BlockPermissions.ConsistentRead;
    public const BlockPermissions ReaderShared = BlockPermissions.ConsistentRead | BlockPermissions.WriteUnchanged;

    /// <summary>
    /// Takes the locks for <paramref name="perm"/> (used) and not-<paramref name="shared"/> on the open
    /// file <paramref name="file"/>, then checks that no other user conflicts.
    /// </summary>
    /// <exception cref="ImageException">InUse when another open file conflicts, with qemu's wording
    /// ("Failed to get "write" lock"); Io when the host refuses the lock.</exception>
    public static void Acquire(SafeFileHandle file, string path, BlockPermissions perm, BlockPermissions shared)
    {
        ArgumentNullException.ThrowIfNull(file);
        bool added = false;
        try
        {
            file.DangerousAddRef(ref added);
            int fd = (int)file.DangerousGetHandle();
            for (int i = 0; i < 4; i++)
            {
                var p = (BlockPermissions)(1 << i);
                if ((perm & p) != 0) SetReadLock(fd, path, RawLockPermBase + i);
                if ((shared & p) == 0) SetReadLock(fd, path, RawLockSharedBase + i);
            }
            for (int i = 0; i < 4; i++)
            {
                var p = (BlockPermissions)(1 << i);
                if ((perm & p) != 0 && IsLockedByOthers(fd, path, RawLockSharedBase + i))
                    ThrowInUse(path, $"Failed to get \"{Name(p)}\" lock");
            }
            for (int i = 0; i < 4; i++)
            {
                var p = (BlockPermissions)(1 << i);
                if ((shared & p) == 0 && IsLockedByOthers(fd, path, RawLockPermBase + i))
                    ThrowInUse(path, $"Failed to get shared \"{Name(p)}\" lock");
            }
        }
        finally
        {
            if (added) file.DangerousRelease();
        }
    }

    /// <summary>QEMU's bdrv_perm_names.</summary>
    private static string Name(BlockPermissions p) => p switch
    {
        BlockPermissions.ConsistentRead => "consistent read",
        BlockPermissions.Write => "write",
        BlockPermissions.WriteUnchanged => "write unchanged",
        _ => "resize",
    };

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    private static void ThrowInUse(string path, string what)
        => throw new ImageException(ImageErrorKind.InUse, path, what + "; is another process using the image?");

    private static void SetReadLock(int fd, string path, int offset)
    {
        var lk = new Libc.Flock { l_type = Libc.F_RDLCK, l_whence = 0, l_start = offset, l_len = 1 };
        int rc = Libc.FcntlLock(fd, Libc.F_OFD_SETLK, ref lk); // EINTR retried there
        if (rc == 0) return;
        // Only a write lock conflicts with a read lock; QEMU never takes one, someone else does.
        if (-rc is Libc.EAGAIN or Libc.EACCES) ThrowInUse(path, $"Failed to lock byte {offset}");
        throw new ImageException(ImageErrorKind.Io, path, $"Failed to lock byte {offset}: errno {-rc}");
    }

    private static bool IsLockedByOthers(int fd, string path, int offset)
    {
        // A conflict is believed only if it lasts: a process that forks (any Process.Start in this
        // process, on another thread) holds a copy of every descriptor until the child's exec closes
        // it, so an image this process just closed can keep its locks for that moment.
        for (int attempt = 0; ; attempt++)
        {
            if (!TestLock(fd, path, offset)) return false;
            if (attempt == 10) return true;
            Thread.Sleep(10);
        }
    }

    private static bool TestLock(int fd, string path, int offset)
    {
        // F_OFD_GETLK reports a lock of another open file description that would conflict with this
        // write lock; locks of our own description never conflict with it.
        var lk = new Libc.Flock { l_type = Libc.F_WRLCK, l_whence = 0, l_start = offset, l_len = 1 };
        int rc = Libc.FcntlLock(fd, Libc.F_OFD_GETLK, ref lk); // EINTR retried there
        if (rc != 0)
            throw new ImageException(ImageErrorKind.Io, path, $"Failed to test lock byte {offset}: errno {-rc}");
        return lk.l_type != Libc.F_UNLCK;
    }
}
