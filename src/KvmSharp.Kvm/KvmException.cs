using KvmSharp.Interop;

namespace KvmSharp.Kvm;

/// <summary>A KVM ioctl failed. <see cref="NativeException.Operation"/> names the ioctl.</summary>
public sealed class KvmException : NativeException
{
    public KvmException(string operation, int errno) : base(operation, errno) { }
    public KvmException() { }
    public KvmException(string message) : base(message) { }
    public KvmException(string message, Exception inner) : base(message, inner) { }

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    internal static void Throw(string operation) => throw new KvmException(operation, Libc.LastErrno);
}
