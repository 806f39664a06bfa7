using System.Runtime.InteropServices;

namespace KvmSharp.Interop;

/// <summary>
/// libc entry points used by KvmSharp. One partial class, split by area into files
/// (<c>Libc.Files.cs</c>, <c>Libc.Memory.cs</c> …). Callers outside this assembly use the typed
/// wrappers, never raw request codes.
/// </summary>
public static unsafe partial class Libc
{
    internal const string LibraryName = "libc";

    public const int EINTR = 4;
    public const int EAGAIN = 11;
    public const int ENOENT = 2;
    public const int EACCES = 13;
    public const int EINVAL = 22;

    /// <summary>The errno of the last failed call made through this class.</summary>
    public static int LastErrno => Marshal.GetLastPInvokeError();

    /// <summary>Throws <see cref="NativeException"/> with the errno when <paramref name="result"/> is negative.</summary>
    public static long Check(long result, string operation)
    {
        if (result < 0)
            ThrowNative(operation, LastErrno);
        return result;
    }

    /// <exception cref="NativeException">Always.</exception>
    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    public static void ThrowNative(string operation, int errno) => throw new NativeException(operation, errno);
}
