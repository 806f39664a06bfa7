using System.Runtime.InteropServices;

namespace KvmSharp.Images.Tool;

/// <summary>Disk usage of a file (st_blocks × 512), for "disk size" / "actual-size" as qemu-img reports.</summary>
internal static unsafe partial class HostFile
{
    [LibraryImport("libc", EntryPoint = "stat", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int Stat(string path, byte* buf);

    public static long AllocatedBytes(string path)
    {
        // struct stat on x86-64 glibc is 144 bytes with st_blocks at offset 64 (sys/stat.h, bits/struct_stat.h).
        if (!OperatingSystem.IsLinux() || RuntimeInformation.ProcessArchitecture != Architecture.X64)
            return new FileInfo(path).Length;
        byte* buf = stackalloc byte[256];
        // SAFETY: buf is larger than struct stat on this ABI; stat writes only within it.
        if (Stat(path, buf) != 0) return new FileInfo(path).Length;
        return *(long*)(buf + 64) * 512;
    }
}
