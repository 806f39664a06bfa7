namespace KvmSharp.Memory;

/// <summary>One contiguous range of guest RAM backed by one host mapping.</summary>
public sealed unsafe class GuestRegion
{
    internal GuestRegion(GuestAddress start, ulong size, byte* host)
    {
        Start = start;
        Size = size;
        Host = host;
    }

    public GuestAddress Start { get; }
    public ulong Size { get; }

    /// <summary>Exclusive end (Start + Size); cannot overflow: checked when the layout is built.</summary>
    public ulong End => Start.Value + Size;

    internal byte* Host { get; }

    /// <summary>
    /// Host virtual address of the mapping, for <c>KVM_SET_USER_MEMORY_REGION</c> only. Anything that
    /// reads or writes guest memory goes through <see cref="GuestMemory"/>'s checked accessors.
    /// </summary>
    public nint HostAddressForKvm => (nint)Host;

    public bool Contains(ulong gpa) => gpa >= Start.Value && gpa - Start.Value < Size;
}
