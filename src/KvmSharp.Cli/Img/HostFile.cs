using KvmSharp.Interop;

namespace KvmSharp.Cli.Img;

/// <summary>Disk usage of a file (st_blocks × 512), for "disk size" / "actual-size" as qemu-img reports.</summary>
internal static class HostFile
{
    public static long AllocatedBytes(string path)
        => Libc.TryStatx(Libc.AT_FDCWD, path, 0, out Libc.Statx st) ? (long)st.stx_blocks * 512 : new FileInfo(path).Length;
}
