namespace KvmSharp.Boot;

/// <summary>
/// A decoded 8-byte GDT code/data/system descriptor (Intel SDM Vol. 3A §3.4.5), in the form the VMM
/// needs to fill <c>kvm_segment</c> (base, limit in bytes, type, s, dpl, present, avl, l, db, g).
/// </summary>
public readonly record struct SegmentDescriptor(ulong Base, uint Limit, byte Type, bool S, byte Dpl, bool Present, bool Avl, bool L, bool Db, bool G)
{
    public static SegmentDescriptor Decode(ulong d)
    {
        uint rawLimit = (uint)(d & 0xffff) | (uint)((d >> 32) & 0xf0000);
        ulong baseAddr = ((d >> 16) & 0xffffff) | ((d >> 32) & 0xff000000);
        bool g = ((d >> 55) & 1) != 0;
        return new SegmentDescriptor(
            baseAddr,
            g ? (rawLimit << 12) | 0xfff : rawLimit,
            (byte)((d >> 40) & 0xf),
            ((d >> 44) & 1) != 0,
            (byte)((d >> 45) & 3),
            ((d >> 47) & 1) != 0,
            ((d >> 52) & 1) != 0,
            ((d >> 53) & 1) != 0,
            ((d >> 54) & 1) != 0,
            g);
    }
}
