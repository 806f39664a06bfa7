using KvmSharp.Images;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Cli.Img;

/// <summary><c>img rebase</c>: changes an overlay's backing file, copying what differs between the old and new chain unless -u (qemu-img rebase).</summary>
internal static class RebaseCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["f", "b", "F", "t", "T", "object"];
    private static readonly string[] Flags = ["q", "u", "p", "U", "image-opts", "force-share"];

    public static int Run(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, OptionsWithValue, Flags);
        string path = a.One("image");
        if (!a.Has("b")) throw ImgArgs.Bad("Must specify backing file (-b) or use '-b \"\"' to remove it");
        string newName = a.Get("b")!;
        string? newFmt = a.Get("F");
        string fmt = a.Get("f") ?? BlockDeviceFactory.Probe(path);
        if (fmt != "qcow2") throw new ImageException(ImageErrorKind.UnsupportedFeature, path, "rebase needs a qcow2 image");
        string? name = newName.Length == 0 ? null : newName;
        string? newPath = name is null ? null : BlockDeviceFactory.ResolveBackingPath(path, name);
        // An image cannot be its own backing file, by any name (qemu-img -u would write the loop).
        FileId? topId = ImageFile.Identify(path);
        if (newPath is not null && topId is not null && ImageFile.Identify(newPath) == topId)
            throw new ImageException(ImageErrorKind.BackingChain, path, "cannot rebase an image onto itself");
        if (newPath is not null && newFmt is null && File.Exists(newPath))
            newFmt = BlockDeviceFactory.Probe(newPath);
        if (a.Has("u"))
        {
            using var t = BlockDeviceFactory.OpenQcow2(path, false);
            t.FinishOpen();
            t.SetBacking(name, newFmt);
            return 0;
        }
        // Safe mode: copy into the overlay every cluster it does not hold whose content differs between
        // the old and the new backing chain, then switch the header. The new chain must not contain
        // the overlay (that loop would make it read itself).
        bool share = a.ForceShare;
        using var top = (Qcow2Image)BlockDeviceFactory.Open(path, false, "qcow2", openBacking: true, forceShare: share);
        var files = topId is { } tid ? new HashSet<FileId> { tid } : new HashSet<FileId>();
        using IBlockDevice? nb = newPath is null ? null : BlockDeviceFactory.Open(newPath, true, newFmt, openBacking: true, forceShare: share, chain: files);
        int cs = top.ClusterSize;
        var oldBuf = new byte[cs];
        var newBuf = new byte[cs];
        ulong off = 0;
        while (off < top.Size)
        {
            var st = top.GetBlockStatus(off, top.Size - off);
            ulong end = off + st.Length;
            if (st.State != BlockState.Unallocated)
            {
                off = end;
                continue;
            }
            while (off < end)
            {
                // Ranges both chains know to be zero need no reading (one step per extent).
                ulong len = end - off;
                if (top.Backing is { } ob0)
                {
                    var olds = ChainExtent.At(ob0, off, len);
                    if (olds.Data || !olds.Zero) len = 0;
                    else len = olds.Length;
                }
                if (len > 0 && nb is not null && off < nb.Size)
                {
                    var news = ChainExtent.At(nb, off, len);
                    len = news.Data || !news.Zero ? 0 : news.Length;
                }
                if (len > 0)
                {
                    off += len;
                    continue;
                }
                int n = (int)Math.Min((ulong)cs - off % (ulong)cs, end - off);
                var ob = oldBuf.AsSpan(0, n);
                var nbuf = newBuf.AsSpan(0, n);
                top.Read(ob, off);
                nbuf.Clear();
                if (nb is not null && off < nb.Size)
                {
                    int m = (int)Math.Min((ulong)n, nb.Size - off);
                    nb.Read(nbuf[..m], off);
                }
                if (!ob.SequenceEqual(nbuf)) top.Write(ob, off);
                off += (ulong)n;
            }
        }
        top.Flush();
        top.SetBacking(name, newFmt);
        return 0;
    }
}
