using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace KvmSharp.Interop;

/// <summary>
/// One buffer of a scattered transfer, laid out as POSIX <c>struct iovec</c> so a list of them goes
/// to preadv/pwritev as it is (<see cref="Libc.PReadV"/>). Points at memory that does not move and
/// outlives the call (guest RAM). Built by the devices, consumed by the disk back ends.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
public readonly unsafe struct NativeBuffer
{
    private readonly void* _base;
    private readonly nuint _length;

    /// <summary>Wraps <paramref name="span"/>, which must be native memory (never a managed array).</summary>
    public NativeBuffer(Span<byte> span)
    {
        // SAFETY: the span is native memory (the caller's contract), so its address does not move.
        _base = Unsafe.AsPointer(ref MemoryMarshal.GetReference(span));
        _length = (nuint)span.Length;
    }

    private NativeBuffer(void* start, nuint length)
    {
        _base = start;
        _length = length;
    }

    public int Length => (int)_length;

    public Span<byte> Span => new(_base, (int)_length);

    /// <summary>The same buffer without its first <paramref name="count"/> bytes.</summary>
    public NativeBuffer Skip(int count) => new((byte*)_base + count, _length - (nuint)count);
}
