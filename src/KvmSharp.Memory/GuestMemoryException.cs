namespace KvmSharp.Memory;

/// <summary>An access to guest memory fell outside guest RAM or overflowed.</summary>
public sealed class GuestMemoryException : Exception
{
    public GuestMemoryException(GuestAddress address, ulong length)
        : base($"Guest memory access at {address} of {length} bytes is outside guest RAM.")
    {
        Address = address;
        Length = length;
    }

    public GuestMemoryException() { }
    public GuestMemoryException(string message) : base(message) { }
    public GuestMemoryException(string message, Exception inner) : base(message, inner) { }

    public GuestAddress Address { get; }
    public ulong Length { get; }
}
