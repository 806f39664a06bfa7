using System.Buffers.Binary;

namespace KvmSharp.Images.Qcow2;

/// <summary>
/// Entries of a refcount block, qcow2.txt "Host cluster management": refcount_bits = 2^refcount_order
/// bits each, big endian; entries narrower than a byte fill it from the least significant bit.
/// </summary>
internal static class RefcountBlock
{
    /// <summary>Refcount <paramref name="index"/> of <paramref name="block"/>.</summary>
    public static ulong Get(ReadOnlySpan<byte> block, ulong index, int refcountOrder)
    {
        switch (refcountOrder)
        {
            case < 3:
                {
                    int bits = 1 << refcountOrder;
                    int perByte = 8 >> refcountOrder;
                    int shift = (int)(index % (ulong)perByte) * bits;
                    return (ulong)(block[(int)(index / (ulong)perByte)] >> shift) & ((1UL << bits) - 1);
                }
            case 3: return block[(int)index];
            case 4: return BinaryPrimitives.ReadUInt16BigEndian(block[(int)(index * 2)..]);
            case 5: return BinaryPrimitives.ReadUInt32BigEndian(block[(int)(index * 4)..]);
            default: return BinaryPrimitives.ReadUInt64BigEndian(block[(int)(index * 8)..]);
        }
    }

    /// <summary>Sets refcount <paramref name="index"/> of <paramref name="block"/> (the caller checked the range).</summary>
    public static void Set(Span<byte> block, ulong index, int refcountOrder, ulong value)
    {
        switch (refcountOrder)
        {
            case < 3:
                {
                    int bits = 1 << refcountOrder;
                    int perByte = 8 >> refcountOrder;
                    int shift = (int)(index % (ulong)perByte) * bits;
                    int at = (int)(index / (ulong)perByte);
                    int mask = ((1 << bits) - 1) << shift;
                    block[at] = (byte)((block[at] & ~mask) | (((int)value << shift) & mask));
                    break;
                }
            case 3: block[(int)index] = (byte)value; break;
            case 4: BinaryPrimitives.WriteUInt16BigEndian(block[(int)(index * 2)..], (ushort)value); break;
            case 5: BinaryPrimitives.WriteUInt32BigEndian(block[(int)(index * 4)..], (uint)value); break;
            default: BinaryPrimitives.WriteUInt64BigEndian(block[(int)(index * 8)..], value); break;
        }
    }

    /// <summary>The largest refcount an entry holds: 2^refcount_bits - 1.</summary>
    public static ulong MaxRefcount(int refcountOrder) => refcountOrder == 6 ? ulong.MaxValue : (1UL << (1 << refcountOrder)) - 1;
}
