using System.Runtime.InteropServices;

namespace KvmSharp.Interop;

public static unsafe partial class Libc
{
    public const int EFD_CLOEXEC = 0x80000;
    public const int EFD_NONBLOCK = 0x800;
    public const uint EPOLLIN = 0x001;
    public const uint EPOLLOUT = 0x004;
    public const uint EPOLLERR = 0x008;
    public const uint EPOLLHUP = 0x010;
    public const int EPOLL_CTL_ADD = 1;
    public const int EPOLL_CTL_DEL = 2;
    public const int EPOLL_CTL_MOD = 3;
    public const int EPOLL_CLOEXEC = 0x80000;
    public const int SIGUSR2 = 12;

    /// <summary>struct epoll_event is packed on x86-64.</summary>
    [StructLayout(LayoutKind.Sequential, Pack = 1)]
    public struct EpollEvent
    {
        public uint events;
        public ulong data;
    }

    [LibraryImport(LibraryName, EntryPoint = "eventfd", SetLastError = true)]
    private static partial int eventfd_(uint initval, int flags);

    [LibraryImport(LibraryName, EntryPoint = "epoll_create1", SetLastError = true)]
    private static partial int epoll_create1_(int flags);

    [LibraryImport(LibraryName, EntryPoint = "epoll_ctl", SetLastError = true)]
    public static partial int epoll_ctl(int epfd, int op, int fd, EpollEvent* ev);

    [LibraryImport(LibraryName, EntryPoint = "epoll_wait", SetLastError = true)]
    public static partial int epoll_wait(int epfd, EpollEvent* events, int maxevents, int timeout);

    // gettid/getpid: no errno, no pointers, nothing a wrapper would add; the VMM needs them for tgkill.
    [LibraryImport(LibraryName, EntryPoint = "gettid")]
    [System.Diagnostics.CodeAnalysis.SuppressMessage("Interoperability", "CA1401", Justification = "A trivial call; see above.")]
    public static partial int gettid();

    [LibraryImport(LibraryName, EntryPoint = "getpid")]
    [System.Diagnostics.CodeAnalysis.SuppressMessage("Interoperability", "CA1401", Justification = "A trivial call; see above.")]
    public static partial int getpid();

    [LibraryImport(LibraryName, EntryPoint = "tgkill", SetLastError = true)]
    public static partial int tgkill(int tgid, int tid, int sig);

    /// <exception cref="NativeException">eventfd(2) failed.</exception>
    public static FileDescriptor EventFd(bool nonBlocking = true)
    {
        int fd = eventfd_(0, EFD_CLOEXEC | (nonBlocking ? EFD_NONBLOCK : 0));
        if (fd < 0)
            ThrowNative("eventfd", LastErrno);
        return new FileDescriptor(fd);
    }

    /// <exception cref="NativeException">epoll_create1(2) failed.</exception>
    public static FileDescriptor EpollCreate()
    {
        int fd = epoll_create1_(EPOLL_CLOEXEC);
        if (fd < 0)
            ThrowNative("epoll_create1", LastErrno);
        return new FileDescriptor(fd);
    }

    /// <summary>Signals an eventfd (adds 1). Returns false on failure.</summary>
    public static bool EventFdWrite(int fd)
    {
        ulong one = 1;
        // SAFETY: &one is an 8-byte local, the size an eventfd write takes (eventfd(2)).
        return write(fd, &one, 8) == 8;
    }

    /// <summary>Drains an eventfd; returns the counter or 0 when nothing was pending.</summary>
    public static ulong EventFdRead(int fd)
    {
        ulong value = 0;
        // SAFETY: &value is an 8-byte local, the size an eventfd read fills (eventfd(2)).
        return read(fd, &value, 8) == 8 ? value : 0;
    }
}
