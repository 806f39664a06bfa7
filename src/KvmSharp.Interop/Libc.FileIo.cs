using System.Runtime.InteropServices;

namespace KvmSharp.Interop;

/// <summary>Positioned and vectored file I/O, file status and open-file-description locks: what the disk
/// image back ends (KvmSharp.Images) need beyond <see cref="System.IO.RandomAccess"/>.</summary>
public static unsafe partial class Libc
{
    /// <summary>Linux's IOV_MAX: the most buffers one preadv/pwritev takes.</summary>
    public const int IOV_MAX = 1024;

    public const int SEEK_END = 2;

    [LibraryImport(LibraryName, EntryPoint = "preadv", SetLastError = true)]
    private static partial nint preadv(int fd, NativeBuffer* iov, int iovcnt, long offset);

    [LibraryImport(LibraryName, EntryPoint = "pwritev", SetLastError = true)]
    private static partial nint pwritev(int fd, NativeBuffer* iov, int iovcnt, long offset);

    [LibraryImport(LibraryName, EntryPoint = "lseek", SetLastError = true)]
    public static partial long lseek(int fd, long offset, int whence);

    /// <summary>preadv(2) of at most <see cref="IOV_MAX"/> buffers, retried on EINTR. Returns the bytes read
    /// (0 at end of file; possibly fewer than asked), or -errno.</summary>
    public static nint PReadV(int fd, ReadOnlySpan<NativeBuffer> buffers, long offset)
    {
        // SAFETY: buffers is pinned for the call and its length is passed with it; each NativeBuffer
        // names memory its creator keeps alive and unmoved for the transfer.
        fixed (NativeBuffer* iov = buffers)
        {
            while (true)
            {
                nint n = preadv(fd, iov, buffers.Length, offset);
                if (n >= 0) return n;
                int e = LastErrno;
                if (e != EINTR) return -e;
            }
        }
    }

    /// <summary>pwritev(2) of at most <see cref="IOV_MAX"/> buffers, retried on EINTR. Returns the bytes
    /// written (possibly fewer than asked), or -errno.</summary>
    public static nint PWriteV(int fd, ReadOnlySpan<NativeBuffer> buffers, long offset)
    {
        // SAFETY: as in PReadV.
        fixed (NativeBuffer* iov = buffers)
        {
            while (true)
            {
                nint n = pwritev(fd, iov, buffers.Length, offset);
                if (n >= 0) return n;
                int e = LastErrno;
                if (e != EINTR) return -e;
            }
        }
    }

    // ---------------------------------------------------------------- statx(2)

    public const int AT_FDCWD = -100;
    public const int AT_EMPTY_PATH = 0x1000;
    public const uint STATX_BASIC_STATS = 0x7ff;

    // sys/stat.h: S_IFMT and the file types.
    public const int S_IFMT = 0xF000;
    public const int S_IFIFO = 0x1000;
    public const int S_IFCHR = 0x2000;
    public const int S_IFDIR = 0x4000;
    public const int S_IFBLK = 0x6000;
    public const int S_IFREG = 0x8000;
    public const int S_IFSOCK = 0xC000;

    /// <summary>struct statx (include/uapi/linux/stat.h), 256 bytes, one layout on every architecture
    /// (unlike struct stat); only the fields KvmSharp reads are declared.</summary>
    [StructLayout(LayoutKind.Explicit, Size = 256)]
    public struct Statx
    {
        [FieldOffset(28)] public ushort stx_mode;
        [FieldOffset(32)] public ulong stx_ino;
        /// <summary>512-byte blocks allocated on the host.</summary>
        [FieldOffset(48)] public ulong stx_blocks;
        [FieldOffset(136)] public uint stx_dev_major;
        [FieldOffset(140)] public uint stx_dev_minor;
    }

    [LibraryImport(LibraryName, EntryPoint = "statx", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int statx(int dirfd, string path, int flags, uint mask, Statx* buf);

    /// <summary>statx(2) with <see cref="STATX_BASIC_STATS"/>: <paramref name="path"/> relative to
    /// <paramref name="dirfd"/> (or the open file <paramref name="dirfd"/> itself with "" and
    /// <see cref="AT_EMPTY_PATH"/>). False on failure, errno in <see cref="LastErrno"/>.</summary>
    public static bool TryStatx(int dirfd, string path, int flags, out Statx status)
    {
        Statx st = default;
        // SAFETY: st is a local of the size statx writes (256 bytes); the call does not keep the pointer.
        int rc = statx(dirfd, path, flags, STATX_BASIC_STATS, &st);
        status = st;
        return rc == 0;
    }

    // ---------------------------------------------------------------- open file description locks

    // fcntl.h (Linux, every architecture): F_OFD_GETLK 36, F_OFD_SETLK 37; l_type F_RDLCK 0, F_WRLCK 1, F_UNLCK 2.
    public const int F_OFD_GETLK = 36;
    public const int F_OFD_SETLK = 37;
    public const short F_RDLCK = 0;
    public const short F_WRLCK = 1;
    public const short F_UNLCK = 2;

    /// <summary>struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (32 bytes).</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct Flock
    {
        public short l_type;
        public short l_whence;
        public long l_start;
        public long l_len;
        public int l_pid;
    }

    [LibraryImport(LibraryName, EntryPoint = "fcntl", SetLastError = true)]
    private static partial int fcntl_flock(int fd, int cmd, Flock* lk);

    /// <summary>fcntl(2) with a lock command (<see cref="F_OFD_SETLK"/>, <see cref="F_OFD_GETLK"/>), retried on
    /// EINTR. Returns 0, or -errno.</summary>
    public static int FcntlLock(int fd, int cmd, ref Flock lk)
    {
        // SAFETY: lk is pinned for the call; fcntl reads and (GETLK) writes only the struct.
        fixed (Flock* p = &lk)
        {
            while (fcntl_flock(fd, cmd, p) != 0)
            {
                int e = LastErrno;
                if (e != EINTR) return -e;
            }
            return 0;
        }
    }
}
