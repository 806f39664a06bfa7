using System.Text;
using KvmSharp.Images;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Cli.Img;

/// <summary><c>img create</c>: a new raw or qcow2 image, optionally over a backing file (qemu-img create).</summary>
internal static class CreateCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["f", "b", "F", "o", "object"];
    private static readonly string[] Flags = ["q", "u"];

    public static int Run(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, OptionsWithValue, Flags);
        if (a.Positional.Count is < 1 or > 2) throw ImgArgs.Bad("Expecting image file name");
        string path = a.Positional[0];
        string fmt = a.Get("f") ?? "raw";
        var opts = new Qcow2CreateOptions { BackingFile = a.Get("b"), BackingFormat = a.Get("F") };
        ulong? size = a.Positional.Count == 2 ? ImgArgs.ParseSize(a.Positional[1]) : null;
        bool compatGiven = false;
        foreach (var (k, v) in ImgArgs.ParseOptions(a.Get("o")))
        {
            switch (k)
            {
                case "size": size = ImgArgs.ParseSize(v); break;
                case "cluster_size":
                    // Range-checked before narrowing: 4294967808 must not become 512.
                    ulong cs = ImgArgs.ParseSize(v);
                    if (cs < 1UL << Qcow2Const.MinClusterBits || cs > 1UL << Qcow2Const.MaxClusterBits || (cs & (cs - 1)) != 0)
                        throw ImgArgs.Bad("Cluster size must be a power of two between 512 and 2048k");
                    opts.ClusterSize = (int)cs;
                    break;
                case "lazy_refcounts": opts.LazyRefcounts = OnOff(k, v); break;
                case "extended_l2": opts.ExtendedL2 = OnOff(k, v); break;
                case "refcount_bits": opts.RefcountBits = int.Parse(v, ImgOutput.Inv); break;
                case "backing_file": opts.BackingFile = v; break;
                case "backing_fmt": opts.BackingFormat = v; break;
                case "compat":
                    compatGiven = true;
                    opts.Version = v switch { "0.10" or "v2" => 2, "1.1" or "v3" => 3, _ => throw ImgArgs.Bad($"Invalid compatibility level: '{v}'") };
                    break;
                case "compression_type":
                    opts.CompressionType = v switch { "zlib" => 0, "zstd" => 1, _ => throw ImgArgs.Bad($"Invalid compression type '{v}'") };
                    break;
                case "preallocation" when v == "off": break;
                default: throw ImgArgs.Bad($"Invalid parameter '{k}'");
            }
        }
        if (fmt != "raw" && fmt != "qcow2") throw ImgArgs.Bad($"Unknown file format '{fmt}'");
        if (opts.BackingFile is not null && fmt != "qcow2") throw ImgArgs.Bad($"Backing file not supported for file format '{fmt}'");
        // Held open (as a reader, unsharing write) until the new image exists, as qemu-img does.
        using IBlockDevice? backing = opts.BackingFile is null ? null : OpenNewBacking(path, opts, a.Has("u") && size is not null);
        size ??= backing?.Size;
        if (size is null) throw ImgArgs.Bad("Image creation needs a size parameter");
        ulong sz = (size.Value + 511) & ~511UL; // size <= INT64_MAX (ParseSize): no wrap
        if (fmt == "raw")
        {
            if (!a.Has("q")) o.WriteLine($"Formatting '{path}', fmt=raw size={sz}");
            RawImage.Create(path, sz);
            return 0;
        }
        opts.Size = sz;
        if (!a.Has("q"))
        {
            var sb = new StringBuilder($"Formatting '{path}', fmt=qcow2 cluster_size={opts.ClusterSize}");
            if (compatGiven) sb.Append(opts.Version == 2 ? " compat=0.10" : " compat=1.1");
            sb.Append($" extended_l2={(opts.ExtendedL2 ? "on" : "off")} compression_type={(opts.CompressionType == 1 ? "zstd" : "zlib")} size={sz}");
            if (opts.BackingFile is not null) sb.Append($" backing_file={opts.BackingFile}");
            if (opts.BackingFormat is not null && opts.BackingFile is not null) sb.Append($" backing_fmt={opts.BackingFormat}");
            sb.Append($" lazy_refcounts={(opts.LazyRefcounts ? "on" : "off")} refcount_bits={opts.RefcountBits}");
            o.WriteLine(sb.ToString());
        }
        Qcow2Creator.Create(path, opts);
        return 0;
    }

    /// <summary>
    /// Checks that the new image is not its own backing file nor in that file's chain (creating it
    /// would empty the data it is meant to sit on), by device and inode as well as by name, and opens
    /// the backing chain unless <paramref name="unsafeMode"/> (-u with a size) says not to look.
    /// </summary>
    private static IBlockDevice? OpenNewBacking(string path, Qcow2CreateOptions opts, bool unsafeMode)
    {
        string bpath = BlockDeviceFactory.ResolveBackingPath(path, opts.BackingFile!);
        if (Path.GetFullPath(bpath) == Path.GetFullPath(path))
            throw new ImageException(ImageErrorKind.InvalidArgument, path, "Error: Trying to create an image with the same filename as the backing file");
        FileId? target = ImageFile.Identify(path);
        if (unsafeMode)
        {
            if (target is not null && ImageFile.Identify(bpath) == target)
                throw new ImageException(ImageErrorKind.InvalidArgument, path, "Error: Trying to create an image with the same filename as the backing file");
            return null;
        }
        opts.BackingFormat ??= BlockDeviceFactory.Probe(bpath);
        var chain = new HashSet<FileId>();
        var b = BlockDeviceFactory.Open(bpath, true, opts.BackingFormat, openBacking: true, chain: chain);
        if (target is { } t && chain.Contains(t))
        {
            b.Dispose();
            throw new ImageException(ImageErrorKind.InvalidArgument, path, "Error: the new image would be its own backing file (it is in the backing chain of " + opts.BackingFile + ")");
        }
        return b;
    }

    private static bool OnOff(string k, string v) => v switch
    {
        "on" or "true" or "yes" => true,
        "off" or "false" or "no" => false,
        _ => throw ImgArgs.Bad($"Parameter '{k}' expects 'on' or 'off'"),
    };
}
