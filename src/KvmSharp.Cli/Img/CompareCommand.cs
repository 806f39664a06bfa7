using KvmSharp.Images;

namespace KvmSharp.Cli.Img;

/// <summary><c>img compare</c>: whether two image chains read the same, exit 0 same, 1 different, 2 error (qemu-img compare).</summary>
internal static class CompareCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["f", "F", "T", "object"];
    private static readonly string[] Flags = ["p", "q", "s", "U", "image-opts", "force-share"];

    public static int Run(string[] args, TextWriter o, TextWriter e)
    {
        var a = ImgArgs.Parse(args, OptionsWithValue, Flags);
        if (a.Positional.Count != 2) throw ImgArgs.Bad("Expecting two image file names");
        bool quiet = a.Has("q");
        bool share = a.ForceShare;
        using var d1 = BlockDeviceFactory.Open(a.Positional[0], true, a.Get("f"), openBacking: true, forceShare: share);
        using var d2 = BlockDeviceFactory.Open(a.Positional[1], true, a.Get("F"), openBacking: true, forceShare: share);
        ulong common = Math.Min(d1.Size, d2.Size);
        var b1 = new byte[1 << 20];
        var b2 = new byte[1 << 20];
        ulong off = 0;
        ChainExtent s1 = default, s2 = default;
        while (off < common)
        {
            // Each side's extent is asked once and kept until passed: zero or unallocated on both sides
            // is skipped in one step, so time follows the metadata, not the virtual size.
            if (off >= s1.Start + s1.Length) s1 = ChainExtent.At(d1, off, common - off);
            if (off >= s2.Start + s2.Length) s2 = ChainExtent.At(d2, off, common - off);
            ulong until = Math.Min(s1.Start + s1.Length, s2.Start + s2.Length);
            if (!s1.Data && !s2.Data && s1.Zero && s2.Zero)
            {
                off = until;
                continue;
            }
            int n = (int)Math.Min((ulong)b1.Length, until - off);
            d1.Read(b1.AsSpan(0, n), off);
            d2.Read(b2.AsSpan(0, n), off);
            int same = b1.AsSpan(0, n).CommonPrefixLength(b2.AsSpan(0, n));
            if (same < n)
            {
                if (!quiet) o.WriteLine($"Content mismatch at offset {(off + (ulong)same) & ~511UL}!");
                return 1;
            }
            off += (ulong)n;
        }
        if (d1.Size != d2.Size)
        {
            if (a.Has("s"))
            {
                if (!quiet) o.WriteLine("Strict mode: Image size mismatch!");
                return 1;
            }
            if (!quiet) e.WriteLine("Warning: Image size mismatch!");
            var big = d1.Size > d2.Size ? d1 : d2;
            ChainExtent t = default;
            while (off < big.Size)
            {
                if (off >= t.Start + t.Length) t = ChainExtent.At(big, off, big.Size - off);
                if (!t.Data && t.Zero)
                {
                    off = t.Start + t.Length;
                    continue;
                }
                int n = (int)Math.Min((ulong)b1.Length, t.Start + t.Length - off);
                big.Read(b1.AsSpan(0, n), off);
                int z = b1.AsSpan(0, n).IndexOfAnyExcept((byte)0);
                if (z >= 0)
                {
                    if (!quiet) o.WriteLine($"Content mismatch at offset {(off + (ulong)z) & ~511UL}!");
                    return 1;
                }
                off += (ulong)n;
            }
        }
        if (!quiet) o.WriteLine("Images are identical.");
        return 0;
    }
}
