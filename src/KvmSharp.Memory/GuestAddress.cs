namespace KvmSharp.Memory;

/// <summary>A guest-physical address. Never a host pointer or a file offset (vm-memory DESIGN.md).</summary>
public readonly record struct GuestAddress(ulong Value) : IComparable<GuestAddress>
{
    /// <summary>Adds <paramref name="offset"/>; false on 64-bit overflow.</summary>
    public bool TryAdd(ulong offset, out GuestAddress result)
    {
        ulong v = Value + offset;
        result = new GuestAddress(v);
        return v >= Value;
    }

    /// <exception cref="OverflowException">The sum does not fit in 64 bits.</exception>
    public GuestAddress Add(ulong offset) => new(checked(Value + offset));

    public int CompareTo(GuestAddress other) => Value.CompareTo(other.Value);

    public static bool operator <(GuestAddress a, GuestAddress b) => a.Value < b.Value;
    public static bool operator >(GuestAddress a, GuestAddress b) => a.Value > b.Value;
    public static bool operator <=(GuestAddress a, GuestAddress b) => a.Value <= b.Value;
    public static bool operator >=(GuestAddress a, GuestAddress b) => a.Value >= b.Value;

    public override string ToString() => $"0x{Value:x}";
}
