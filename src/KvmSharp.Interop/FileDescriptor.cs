using System.Runtime.InteropServices;

namespace KvmSharp.Interop;

/// <summary>
/// An owned file descriptor. Closed once, without retrying on EINTR (close(2): the fd is gone
/// either way on Linux).
/// </summary>
public sealed class FileDescriptor : SafeHandle
{
    public FileDescriptor() : base(-1, ownsHandle: true) { }

    public FileDescriptor(int fd) : base(-1, ownsHandle: true) => SetHandle(fd);

    public override bool IsInvalid => handle < 0;

    /// <summary>The raw descriptor. Valid while this object is alive and not disposed.</summary>
    public int Fd => (int)handle;

    protected override bool ReleaseHandle() => Libc.close((int)handle) == 0;
}
