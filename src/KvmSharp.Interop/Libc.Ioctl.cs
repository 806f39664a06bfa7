using System.Runtime.InteropServices;

namespace KvmSharp.Interop;

public static unsafe partial class Libc
{
    // ioctl is variadic; on Linux x86-64 passing the third argument as a pointer-sized integer is
    // ABI-compatible (dotnet/runtime#48796). Internal, and visible to KvmSharp.Kvm only
    // (AssemblyInfo.cs): callers never pass request codes, they call the typed wrappers there or here
    // (Libc.Tap.cs). tests/KvmSharp.Architecture.Tests keeps it that way.
    [LibraryImport(LibraryName, EntryPoint = "ioctl", SetLastError = true)]
    internal static partial int ioctl(int fd, nuint request, nint arg);

    [LibraryImport(LibraryName, EntryPoint = "ioctl", SetLastError = true)]
    internal static partial int ioctl(int fd, nuint request, void* arg);

    // _IOC encoding from include/uapi/asm-generic/ioctl.h.
    private const int IocNrShift = 0, IocTypeShift = 8, IocSizeShift = 16, IocDirShift = 30;
    private const uint IocNone = 0, IocWrite = 1, IocRead = 2;

    internal static nuint IO(uint type, uint nr) => Ioc(IocNone, type, nr, 0);
    internal static nuint IOR(uint type, uint nr, uint size) => Ioc(IocRead, type, nr, size);
    internal static nuint IOW(uint type, uint nr, uint size) => Ioc(IocWrite, type, nr, size);
    internal static nuint IOWR(uint type, uint nr, uint size) => Ioc(IocRead | IocWrite, type, nr, size);

    private static nuint Ioc(uint dir, uint type, uint nr, uint size) =>
        (nuint)((dir << IocDirShift) | (type << IocTypeShift) | (nr << IocNrShift) | (size << IocSizeShift));
}
