using KvmSharp.Images;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Cli.Img;

/// <summary><c>img commit</c>: writes an overlay's data into its backing file and empties the overlay (qemu-img commit).</summary>
internal static class CommitCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["f", "t", "b", "r", "object"];
    private static readonly string[] Flags = ["q", "d", "p", "image-opts"];

    public static int Run(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, OptionsWithValue, Flags);
        string path = a.One("image");
        if (a.Has("b")) throw ImgArgs.Bad("commit -b is not supported; the image is committed into its immediate backing file");
        string fmt = a.Get("f") ?? BlockDeviceFactory.Probe(path);
        if (fmt != "qcow2") throw new ImageException(ImageErrorKind.UnsupportedFeature, path, "Image does not have a backing file");
        string basePath;
        string? baseFmt;
        ulong topSize;
        using (var top = BlockDeviceFactory.OpenQcow2(path, true))
        {
            if (top.Header.BackingFile is null) throw new ImageException(ImageErrorKind.InvalidArgument, path, "Image does not have a backing file");
            basePath = BlockDeviceFactory.ResolveBackingPath(path, top.Header.BackingFile);
            baseFmt = top.Header.BackingFormat;
            topSize = top.Size;
            // The base (and its chain) must not be the overlay itself, under any name: committing an
            // image into itself and then emptying it would lose its data.
            var files = new HashSet<FileId>();
            if (ImageFile.Identify(path) is { } topId)
            {
                if (ImageFile.Identify(basePath) == topId)
                    throw new ImageException(ImageErrorKind.BackingChain, path, "backing chain loops back to this file");
                files.Add(topId);
            }
            using var b = BlockDeviceFactory.Open(basePath, false, baseFmt, openBacking: true, chain: files);
            if (b.Size < topSize)
            {
                if (b is RawImage rb) rb.Resize(topSize);
                else if (b is Qcow2Image qb) qb.Resize(topSize);
            }
            var buf = new byte[Math.Max(top.ClusterSize, 1 << 20)];
            ulong off = 0;
            while (off < topSize)
            {
                // ChainExtent by extent: an unallocated run of the overlay costs one step, whatever its length.
                var st = top.GetBlockStatus(off, topSize - off);
                if (st.State == BlockState.Data)
                {
                    for (ulong done = 0; done < st.Length;)
                    {
                        var span = buf.AsSpan(0, (int)Math.Min((ulong)buf.Length, st.Length - done));
                        top.Read(span, off + done); // top opened without its backing: allocated ranges read their own data
                        b.Write(span, off + done);
                        done += (ulong)span.Length;
                    }
                }
                else if (st.State == BlockState.Zero) b.WriteZeroes(off, st.Length);
                off += st.Length;
            }
            b.Flush();
        }
        if (!a.Has("d"))
        {
            // Empty the overlay (qemu-img commit's make_empty): every cluster falls through to the base again.
            using var top = BlockDeviceFactory.OpenQcow2(path, false);
            top.FinishOpen();
            // Only clusters the metadata maps (data, zero, or a host cluster behind unallocated subclusters).
            for (ulong off = 0; off < top.Size;)
            {
                var st = top.GetBlockStatus(off, top.Size - off);
                if (st.State != BlockState.Unallocated || st.HasOffset)
                {
                    ulong last = (off + st.Length - 1) / (ulong)top.ClusterSize;
                    for (ulong vc = off / (ulong)top.ClusterSize; vc <= last; vc++) top.UnmapCluster(vc);
                }
                off += st.Length;
            }
            top.Flush();
        }
        if (!a.Has("q")) o.WriteLine("Image committed.");
        return 0;
    }
}
