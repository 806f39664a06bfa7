using System.Runtime.InteropServices;

namespace KvmSharp.Interop;

public static unsafe partial class Libc
{
    public const int O_RDONLY = 0;
    public const int O_WRONLY = 1;
    public const int O_RDWR = 2;
    public const int O_NONBLOCK = 0x800;
    public const int O_CLOEXEC = 0x80000;

    [LibraryImport(LibraryName, EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int open_(string path, int flags, int mode);

    [LibraryImport(LibraryName, EntryPoint = "close", SetLastError = true)]
    internal static partial int close(int fd);

    [LibraryImport(LibraryName, EntryPoint = "read", SetLastError = true)]
    public static partial nint read(int fd, void* buf, nuint count);

    [LibraryImport(LibraryName, EntryPoint = "write", SetLastError = true)]
    public static partial nint write(int fd, void* buf, nuint count);

    [LibraryImport(LibraryName, EntryPoint = "strerror")]
    private static partial byte* strerror(int errnum);

    [LibraryImport(LibraryName, EntryPoint = "isatty")]
    private static partial int isatty(int fd);

    /// <summary>Opens <paramref name="path"/>; close-on-exec is always added.</summary>
    /// <exception cref="NativeException">open(2) failed.</exception>
    public static FileDescriptor Open(string path, int flags)
    {
        int fd = open_(path, flags | O_CLOEXEC, 0);
        if (fd < 0)
            ThrowNative($"open({path})", LastErrno);
        return new FileDescriptor(fd);
    }

    public static string StrError(int errno)
    {
        // SAFETY: strerror returns a NUL-terminated string (or null) that stays valid until the next
        // strerror call on this thread; it is copied at once.
        byte* s = strerror(errno);
        return s == null ? $"errno {errno}" : Marshal.PtrToStringUTF8((nint)s) ?? $"errno {errno}";
    }

    /// <summary>Reads into <paramref name="buffer"/>, retrying on EINTR. Returns bytes read, or -errno.</summary>
    public static int Read(int fd, Span<byte> buffer)
    {
        // SAFETY: p pins buffer; read(2) writes at most buffer.Length bytes into it.
        fixed (byte* p = buffer)
        {
            while (true)
            {
                nint n = read(fd, p, (nuint)buffer.Length);
                if (n >= 0)
                    return (int)n;
                int e = LastErrno;
                if (e != EINTR)
                    return -e;
            }
        }
    }

    /// <summary>Writes all of <paramref name="buffer"/>, retrying on EINTR and short writes. Returns 0 or -errno.</summary>
    public static int WriteAll(int fd, ReadOnlySpan<byte> buffer)
    {
        // SAFETY: p pins buffer; each write(2) reads [p + done, p + buffer.Length), done < buffer.Length.
        fixed (byte* p = buffer)
        {
            int done = 0;
            while (done < buffer.Length)
            {
                nint n = write(fd, p + done, (nuint)(buffer.Length - done));
                if (n < 0)
                {
                    int e = LastErrno;
                    if (e == EINTR)
                        continue;
                    return -e;
                }
                done += (int)n;
            }
            return 0;
        }
    }
}
