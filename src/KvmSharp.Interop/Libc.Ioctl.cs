using System.Runtime.InteropServices;

namespace KvmSharp.Interop;

public static unsafe partial class Libc
{
    // ioctl is variadic; on Linux x86-64 passing the third argument as a pointer-sized integer is
    // ABI-compatible (dotnet/runtime#48796). Only typed wrappers in KvmSharp.Kvm call these.
    [LibraryImport(LibraryName, EntryPoint = "ioctl", SetLastError = true)]
    public static partial int ioctl(int fd, nuint request, nint arg);

    [LibraryImport(LibraryName, EntryPoint = "ioctl", SetLastError = true)]
    public static partial int ioctl(int fd, nuint request, void* arg);

    // _IOC encoding from include/uapi/asm-generic/ioctl.h.
    private const int IocNrShift = 0, IocTypeShift = 8, IocSizeShift = 16, IocDirShift = 30;
    private const uint IocNone = 0, IocWrite = 1, IocRead = 2;

    public static nuint IO(uint type, uint nr) => Ioc(IocNone, type, nr, 0);
    public static nuint IOR(uint type, uint nr, uint size) => Ioc(IocRead, type, nr, size);
    public static nuint IOW(uint type, uint nr, uint size) => Ioc(IocWrite, type, nr, size);
    public static nuint IOWR(uint type, uint nr, uint size) => Ioc(IocRead | IocWrite, type, nr, size);

    private static nuint Ioc(uint dir, uint type, uint nr, uint size) =>
        (nuint)((dir << IocDirShift) | (type << IocTypeShift) | (nr << IocNrShift) | (size << IocSizeShift));
}
