using KvmSharp.Images;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Cli.Img;

/// <summary>One extent of a chain's allocation map, as qemu-img map reports it: which layer of the
/// backing chain provides the bytes, and how. map, convert, compare and rebase walk images by it.</summary>
internal struct ChainExtent
{
    public ulong Start, Length;
    public int Depth;
    public bool Present, Zero, Data;
    public ulong Offset; // valid when HasOffset
    public bool HasOffset;
    public string? File;

    private static string PathOf(IBlockDevice d) => d switch
    {
        Qcow2Image q => q.Path,
        RawImage r => r.Path,
        _ => "?",
    };

    /// <summary>Walks the chain at <paramref name="off"/>: which layer provides the data, and how, for
    /// as many bytes (up to <paramref name="max"/>) as the answer holds. Each layer answers from its
    /// metadata (<see cref="IBlockDevice.GetBlockStatus"/>), so a long unallocated or zero run is one step.</summary>
    public static ChainExtent At(IBlockDevice top, ulong off, ulong max)
    {
        IBlockDevice dev = top;
        int depth = 0;
        while (true)
        {
            // A backing file shorter than its overlay reads as zeros past its end (qemu reports the overlay's depth).
            if (off >= dev.Size)
                return new ChainExtent { Start = off, Length = max, Depth = Math.Max(0, depth - 1), Present = false, Zero = true };
            var st = dev.GetBlockStatus(off, max);
            var e = new ChainExtent { Start = off, Length = st.Length, Depth = depth, HasOffset = st.HasOffset, Offset = st.HasOffset ? st.HostOffset : 0 };
            switch (st.State)
            {
                case BlockState.Data:
                    e.Present = e.Data = true;
                    if (e.HasOffset) e.File = PathOf(dev);
                    return e;
                case BlockState.Zero:
                    e.Present = e.Zero = true;
                    return e;
            }
            IBlockDevice? backing = (dev as Qcow2Image)?.Backing;
            if (backing is null)
            {
                e.Zero = true;
                return e;
            }
            dev = backing;
            max = st.Length;
            depth++;
        }
    }

    /// <summary>The whole image as maximal extents (neighbours that qemu-img map would print as one merged).</summary>
    public static IEnumerable<ChainExtent> Walk(IBlockDevice top)
    {
        ulong off = 0, size = top.Size;
        ChainExtent cur = default;
        bool have = false;
        while (off < size)
        {
            var e = At(top, off, size - off);
            if (e.Length == 0) break;
            if (have && cur.Depth == e.Depth && cur.Present == e.Present && cur.Zero == e.Zero && cur.Data == e.Data
                && cur.HasOffset == e.HasOffset && (!e.HasOffset || cur.Offset + cur.Length == e.Offset && cur.File == e.File))
            {
                cur.Length += e.Length;
            }
            else
            {
                if (have) yield return cur;
                cur = e;
                have = true;
            }
            off += e.Length;
        }
        if (have) yield return cur;
    }
}
