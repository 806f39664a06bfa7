using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Images.Tool;

/// <summary>
/// <c>kvmsharp img</c>: qemu-img's syntax, output and exit codes for create, info, check, convert, commit,
/// rebase, resize, map, compare, snapshot -l and bench. Errors are one line naming the file.
/// </summary>
public static partial class ImgCommand
{
    private static readonly CultureInfo Inv = CultureInfo.InvariantCulture;

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        ArgumentNullException.ThrowIfNull(args);
        ArgumentNullException.ThrowIfNull(stdout);
        ArgumentNullException.ThrowIfNull(stderr);
        if (args.Length == 0 || args[0] is "-h" or "--help" or "help")
        {
            stdout.Write(Usage);
            return args.Length == 0 ? 1 : 0;
        }
        string cmd = args[0];
        var rest = args[1..];
        try
        {
            return cmd switch
            {
                "create" => Create(rest, stdout),
                "info" => Info(rest, stdout),
                "check" => Check(rest, stdout, stderr),
                "convert" => Convert(rest, stdout),
                "commit" => Commit(rest, stdout),
                "rebase" => Rebase(rest, stdout),
                "resize" => Resize(rest, stdout),
                "map" => Map(rest, stdout),
                "compare" => Compare(rest, stdout, stderr),
                "snapshot" => Snapshot(rest, stdout),
                "bench" => Bench(rest, stdout),
                _ => throw ImgArgs.Bad($"Command not found: {cmd}"),
            };
        }
        catch (ImageException e)
        {
            stderr.WriteLine("img: " + e.ToUserString());
            return cmd == "compare" ? 2 : 1;
        }
        catch (Exception e) when (e is OverflowException or FormatException)
        {
            stderr.WriteLine("img: invalid number: " + e.Message);
            return 1;
        }
        catch (Exception e) when (e is ArgumentException)
        {
            stderr.WriteLine("img: " + e.Message);
            return 1;
        }
    }

    private const string Usage = """
        usage: kvmsharp img COMMAND [options]
          create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
          info [-f fmt] [--output=human|json] [--backing-chain] [-U] filename
          check [-q] [-f fmt] [--output=human|json] [-r leaks|all] [-U] filename
          convert [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-o options] filename output_filename
          commit [-q] [-f fmt] [-d] [-p] filename
          compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
          map [-f fmt] [--output=human|json] [-U] filename
          snapshot -l [-U] filename
          rebase [-q] [-f fmt] [-p] [-u] -b backing_file [-F backing_fmt] filename
          resize [-q] [-f fmt] [--shrink] filename [+|-]size
          bench [-c count] [-d depth] [-f fmt] [--flush-interval=n] [-o offset] [--pattern=p] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename

        """;

    /// <summary>-U / --force-share (qemu-img): read-only images take no write or resize lock bytes,
    /// so they open while another process writes them (at the reader's own risk).</summary>
    private static bool ForceShare(ImgArgs a) => a.Has("U") || a.Has("force-share");

    private static string One(ImgArgs a, string what)
    {
        if (a.Positional.Count != 1) throw ImgArgs.Bad($"Expecting one {what} name");
        return a.Positional[0];
    }

    // ------------------------------------------------------------------ create

    private static int Create(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, new[] { "f", "b", "F", "o", "object" }, new[] { "q", "u" });
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
                case "refcount_bits": opts.RefcountBits = int.Parse(v, Inv); break;
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

    // ------------------------------------------------------------------ info

    private static int Info(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, new[] { "f", "output", "object" }, new[] { "U", "backing-chain", "image-opts", "force-share" });
        string path = One(a, "image");
        string output = a.Get("output") ?? "human";
        bool chain = a.Has("backing-chain");
        bool share = ForceShare(a);
        var infos = new List<(string Path, string Fmt)>();
        string? fmt = a.Get("f");
        string cur = path;
        var seen = new HashSet<FileId>();
        while (true)
        {
            if (ImageFile.Identify(cur) is { } id && !seen.Add(id) || infos.Count > Qcow2Const.MaxBackingDepth)
                throw new ImageException(ImageErrorKind.BackingChain, cur, "backing chain loops or is too deep");
            string f = fmt ?? BlockDeviceFactory.Probe(cur);
            infos.Add((cur, f));
            if (!chain || f != "qcow2") break;
            using var q = BlockDeviceFactory.OpenQcow2(cur, true, forceShare: share);
            if (q.Header.BackingFile is null) break;
            fmt = q.Header.BackingFormat;
            cur = BlockDeviceFactory.ResolveBackingPath(cur, q.Header.BackingFile);
        }
        if (output == "json")
        {
            using var ms = new MemoryStream();
            using (var w = new Utf8JsonWriter(ms, new JsonWriterOptions { Indented = true, IndentSize = 4 }))
            {
                if (chain) w.WriteStartArray();
                foreach (var (p, f) in infos) WriteInfoJson(w, p, f, share);
                if (chain) w.WriteEndArray();
            }
            o.WriteLine(Encoding.UTF8.GetString(ms.ToArray()));
        }
        else if (output == "human")
        {
            for (int i = 0; i < infos.Count; i++)
            {
                if (i > 0) o.WriteLine();
                WriteInfoHuman(o, infos[i].Path, infos[i].Fmt, share);
            }
        }
        else throw ImgArgs.Bad($"--output must be used with human or json as argument.");
        return 0;
    }

    private static void WriteInfoHuman(TextWriter o, string path, string fmt, bool share)
    {
        o.WriteLine($"image: {path}");
        o.WriteLine($"file format: {fmt}");
        if (fmt == "raw")
        {
            // qemu-img info reads nothing of a raw image (BDRV_O_NO_IO), so it conflicts with no user.
            using var r = RawImage.Open(path, true, forceShare: true);
            o.WriteLine($"virtual size: {ImgArgs.HumanSize(r.Size)} ({r.Size} bytes)");
            o.WriteLine($"disk size: {ImgArgs.HumanSize((ulong)HostFile.AllocatedBytes(path))}");
            return;
        }
        using var q = BlockDeviceFactory.OpenQcow2(path, true, forceShare: share);
        var h = q.Header;
        o.WriteLine($"virtual size: {ImgArgs.HumanSize(q.Size)} ({q.Size} bytes)");
        o.WriteLine($"disk size: {ImgArgs.HumanSize((ulong)HostFile.AllocatedBytes(path))}");
        o.WriteLine($"cluster_size: {q.ClusterSize}");
        if (h.BackingFile is not null)
        {
            string full = BlockDeviceFactory.ResolveBackingPath(path, h.BackingFile);
            o.WriteLine(full == h.BackingFile ? $"backing file: {h.BackingFile}" : $"backing file: {h.BackingFile} (actual path: {full})");
            if (h.BackingFormat is not null) o.WriteLine($"backing file format: {h.BackingFormat}");
        }
        if (h.NbSnapshots > 0)
        {
            o.WriteLine("Snapshot list:");
            WriteSnapshotTable(o, Qcow2Snapshots.Read(q, out _));
        }
        o.WriteLine("Format specific information:");
        o.WriteLine($"    compat: {(h.Version >= 3 ? "1.1" : "0.10")}");
        o.WriteLine($"    compression type: {(h.CompressionType == 1 ? "zstd" : "zlib")}");
        if (h.Version >= 3)
        {
            o.WriteLine($"    lazy refcounts: {Bool((h.Compatible & Qcow2Const.CompatLazyRefcounts) != 0)}");
            o.WriteLine($"    refcount bits: {h.RefcountBits}");
            o.WriteLine($"    corrupt: {Bool((h.Incompatible & Qcow2Const.IncompatCorrupt) != 0)}");
            o.WriteLine($"    extended l2: {Bool(h.ExtendedL2)}");
        }
        else o.WriteLine($"    refcount bits: {h.RefcountBits}");
    }

    private static string Bool(bool b) => b ? "true" : "false";

    private static void WriteInfoJson(Utf8JsonWriter w, string path, string fmt, bool share)
    {
        w.WriteStartObject();
        if (fmt == "raw")
        {
            using var r = RawImage.Open(path, true, forceShare: true);
            w.WriteNumber("virtual-size", r.Size);
            w.WriteString("filename", path);
            w.WriteString("format", "raw");
            w.WriteNumber("actual-size", HostFile.AllocatedBytes(path));
            w.WriteBoolean("dirty-flag", false);
            w.WriteEndObject();
            return;
        }
        using var q = BlockDeviceFactory.OpenQcow2(path, true, forceShare: share);
        var h = q.Header;
        if (h.NbSnapshots > 0)
        {
            w.WriteStartArray("snapshots");
            foreach (var s in Qcow2Snapshots.Read(q, out _))
            {
                w.WriteStartObject();
                if (s.Icount != ulong.MaxValue) w.WriteNumber("icount", s.Icount);
                w.WriteNumber("vm-clock-nsec", s.VmClockNsec % 1_000_000_000);
                w.WriteString("name", s.Name);
                w.WriteNumber("date-sec", s.DateSec);
                w.WriteNumber("date-nsec", s.DateNsec);
                w.WriteNumber("vm-clock-sec", s.VmClockNsec / 1_000_000_000);
                w.WriteString("id", s.Id);
                w.WriteNumber("vm-state-size", s.VmStateSize);
                w.WriteEndObject();
            }
            w.WriteEndArray();
        }
        if (h.BackingFormat is not null && h.BackingFile is not null) w.WriteString("backing-filename-format", h.BackingFormat);
        w.WriteNumber("virtual-size", q.Size);
        w.WriteString("filename", path);
        w.WriteNumber("cluster-size", q.ClusterSize);
        w.WriteString("format", "qcow2");
        w.WriteNumber("actual-size", HostFile.AllocatedBytes(path));
        w.WriteStartObject("format-specific");
        w.WriteString("type", "qcow2");
        w.WriteStartObject("data");
        w.WriteString("compat", h.Version >= 3 ? "1.1" : "0.10");
        w.WriteString("compression-type", h.CompressionType == 1 ? "zstd" : "zlib");
        if (h.Version >= 3)
        {
            w.WriteBoolean("lazy-refcounts", (h.Compatible & Qcow2Const.CompatLazyRefcounts) != 0);
            w.WriteNumber("refcount-bits", h.RefcountBits);
            w.WriteBoolean("corrupt", (h.Incompatible & Qcow2Const.IncompatCorrupt) != 0);
            w.WriteBoolean("extended-l2", h.ExtendedL2);
        }
        else w.WriteNumber("refcount-bits", h.RefcountBits);
        w.WriteEndObject();
        w.WriteEndObject();
        if (h.BackingFile is not null)
        {
            w.WriteString("full-backing-filename", BlockDeviceFactory.ResolveBackingPath(path, h.BackingFile));
            w.WriteString("backing-filename", h.BackingFile);
        }
        w.WriteBoolean("dirty-flag", (h.Incompatible & Qcow2Const.IncompatDirty) != 0);
        w.WriteEndObject();
    }

    // ------------------------------------------------------------------ check

    private static int Check(string[] args, TextWriter o, TextWriter e)
    {
        var a = ImgArgs.Parse(args, new[] { "f", "output", "r", "T", "object" }, new[] { "q", "U", "image-opts", "force-share" });
        string path = One(a, "image");
        string output = a.Get("output") ?? "human";
        var mode = a.Get("r") switch
        {
            null => Qcow2Check.RepairMode.None,
            "leaks" => Qcow2Check.RepairMode.Leaks,
            "all" => Qcow2Check.RepairMode.All,
            var v => throw ImgArgs.Bad($"Unknown option value for -r (expecting 'leaks' or 'all'): {v}"),
        };
        string fmt = a.Get("f") ?? BlockDeviceFactory.Probe(path);
        if (fmt != "qcow2")
        {
            e.WriteLine("img: This image format does not support checks");
            return 63;
        }
        Qcow2Check.Result r;
        bool quiet = a.Has("q");
        using (var q = OpenForCheck(path, mode != Qcow2Check.RepairMode.None, ForceShare(a)))
        {
            r = Qcow2Check.Run(q, mode, quiet ? null : e); // messages stream out: memory does not grow with them
            if (mode == Qcow2Check.RepairMode.All && r.Corruptions == 0 && (q.Header.Incompatible & (Qcow2Const.IncompatCorrupt | Qcow2Const.IncompatDirty)) != 0)
                q.SetHeaderDirtyBits(q.Header.Incompatible & ~(Qcow2Const.IncompatCorrupt | Qcow2Const.IncompatDirty));
            else if (mode != Qcow2Check.RepairMode.None && r.Corruptions == 0 && r.Leaks == 0 && (q.Header.Incompatible & Qcow2Const.IncompatDirty) != 0)
                q.SetHeaderDirtyBits(q.Header.Incompatible & ~Qcow2Const.IncompatDirty);
        }
        if (output == "json")
        {
            using var ms = new MemoryStream();
            using (var w = new Utf8JsonWriter(ms, new JsonWriterOptions { Indented = true, IndentSize = 4 }))
            {
                w.WriteStartObject();
                w.WriteNumber("image-end-offset", r.ImageEndOffset);
                if (r.Corruptions != 0) w.WriteNumber("corruptions", r.Corruptions);
                if (r.Leaks != 0) w.WriteNumber("leaks", r.Leaks);
                if (r.CorruptionsFixed != 0) w.WriteNumber("corruptions-fixed", r.CorruptionsFixed);
                if (r.LeaksFixed != 0) w.WriteNumber("leaks-fixed", r.LeaksFixed);
                if (r.CompressedClusters != 0) w.WriteNumber("compressed-clusters", r.CompressedClusters);
                w.WriteNumber("total-clusters", r.TotalClusters);
                w.WriteNumber("check-errors", r.CheckErrors);
                if (r.AllocatedClusters != 0) w.WriteNumber("allocated-clusters", r.AllocatedClusters);
                w.WriteString("filename", path);
                w.WriteString("format", "qcow2");
                if (r.FragmentedClusters != 0) w.WriteNumber("fragmented-clusters", r.FragmentedClusters);
                w.WriteEndObject();
            }
            o.WriteLine(Encoding.UTF8.GetString(ms.ToArray()));
        }
        else if (!quiet)
        {
            if (r.LeaksFixed + r.CorruptionsFixed > 0)
            {
                o.WriteLine("The following inconsistencies were found and repaired:");
                o.WriteLine();
                o.WriteLine($"    {r.LeaksFixed} leaked clusters");
                o.WriteLine($"    {r.CorruptionsFixed} corruptions");
                o.WriteLine();
                o.WriteLine("Double checking the fixed image now...");
            }
            if (r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0) o.WriteLine("No errors were found on the image.");
            if (r.Corruptions > 0)
            {
                o.WriteLine();
                o.WriteLine($"{r.Corruptions} errors were found on the image.");
                o.WriteLine("Data may be corrupted, or further writes to the image may corrupt it.");
            }
            if (r.Leaks > 0)
            {
                o.WriteLine();
                o.WriteLine($"{r.Leaks} leaked clusters were found on the image.");
                o.WriteLine("This means waste of disk space, but no harm to data.");
            }
            if (r.TotalClusters != 0)
            {
                double al = r.AllocatedClusters * 100.0 / r.TotalClusters;
                double fr = r.AllocatedClusters == 0 ? 0 : r.FragmentedClusters * 100.0 / r.AllocatedClusters;
                double co = r.AllocatedClusters == 0 ? 0 : r.CompressedClusters * 100.0 / r.AllocatedClusters;
                o.WriteLine(string.Create(Inv, $"{r.AllocatedClusters}/{r.TotalClusters} = {al:F2}% allocated, {fr:F2}% fragmented, {co:F2}% compressed clusters"));
            }
            o.WriteLine($"Image end offset: {r.ImageEndOffset}");
        }
        if (r.CheckErrors > 0) return 1;
        if (r.Corruptions > 0) return 2;
        if (r.Leaks > 0) return 3;
        return 0;
    }

    private static Qcow2Image OpenForCheck(string path, bool write, bool share)
    {
        if (!write) return BlockDeviceFactory.OpenQcow2(path, true, forceShare: share);
        return BlockDeviceFactory.OpenQcow2(path, false, allowCorrupt: true);
    }

    // ------------------------------------------------------------------ snapshot

    private static int Snapshot(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, new[] { "a", "c", "d", "f", "object" }, new[] { "l", "q", "U", "image-opts", "force-share" });
        string path = One(a, "image");
        if (a.Has("a") || a.Has("c") || a.Has("d"))
            throw new ImageException(ImageErrorKind.UnsupportedFeature, path, "only 'snapshot -l' is supported; creating, applying and deleting internal snapshots is not");
        if (!a.Has("l")) throw ImgArgs.Bad("snapshot: one of -l, -a, -c, -d is required");
        string fmt = a.Get("f") ?? BlockDeviceFactory.Probe(path);
        if (fmt != "qcow2") return 0;
        using var q = BlockDeviceFactory.OpenQcow2(path, true, forceShare: ForceShare(a));
        var list = Qcow2Snapshots.Read(q, out _);
        if (list.Count == 0) return 0;
        o.WriteLine("Snapshot list:");
        WriteSnapshotTable(o, list);
        return 0;
    }

    private static void WriteSnapshotTable(TextWriter o, List<Qcow2Snapshot> list)
    {
        // Columns as QEMU's bdrv_snapshot_dump: "%-9s %-17s %7s%20s%13s%11s".
        o.WriteLine(string.Format(Inv, "{0,-9} {1,-17} {2,7}{3,20}{4,13}{5,11}", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"));
        foreach (var s in list)
        {
            string date = DateTimeOffset.FromUnixTimeSeconds(s.DateSec).ToLocalTime().ToString("yyyy-MM-dd HH:mm:ss", Inv);
            ulong ms = s.VmClockNsec / 1_000_000;
            string clock = string.Format(Inv, "{0:00}:{1:00}:{2:00}.{3:000}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
            string icount = s.Icount == ulong.MaxValue ? "" : s.Icount.ToString(Inv);
            o.WriteLine(string.Format(Inv, "{0,-9} {1,-17} {2,7}{3,20}{4,13}{5,11}", s.Id, s.Name, ImgArgs.HumanSize(s.VmStateSize), date, clock, icount));
        }
    }
}
