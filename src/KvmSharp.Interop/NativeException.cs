namespace KvmSharp.Interop;

/// <summary>A host call failed. Carries the operation and the errno it returned.</summary>
public class NativeException : IOException
{
    public NativeException(string operation, int errno)
        : base($"{operation} failed: {Libc.StrError(errno)} (errno {errno}).")
    {
        Operation = operation;
        Errno = errno;
        HResult = errno;
    }

    public NativeException() : this("unknown", 0) { }
    public NativeException(string message) : base(message) { Operation = "unknown"; }
    public NativeException(string message, Exception inner) : base(message, inner) { Operation = "unknown"; }

    /// <summary>The failing operation, e.g. <c>KVM_CREATE_VCPU</c> or <c>open(/dev/kvm)</c>.</summary>
    public string Operation { get; }

    /// <summary>The errno value.</summary>
    public int Errno { get; }
}
