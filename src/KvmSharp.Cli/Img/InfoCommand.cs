using System.Text;
using System.Text.Json;
using KvmSharp.Images;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Cli.Img;

/// <summary><c>img info</c>: what an image is, as text or JSON, optionally for its whole backing chain (qemu-img info).</summary>
internal static class InfoCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["f", "output", "object"];
    private static readonly string[] Flags = ["U", "backing-chain", "image-opts", "force-share"];

    public static int Run(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, OptionsWithValue, Flags);
        string path = a.One("image");
        string output = a.Get("output") ?? "human";
        bool chain = a.Has("backing-chain");
        bool share = a.ForceShare;
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
            o.WriteLine($"virtual size: {ImgOutput.HumanSize(r.Size)} ({r.Size} bytes)");
            o.WriteLine($"disk size: {ImgOutput.HumanSize((ulong)HostFile.AllocatedBytes(path))}");
            return;
        }
        using var q = BlockDeviceFactory.OpenQcow2(path, true, forceShare: share);
        var h = q.Header;
        o.WriteLine($"virtual size: {ImgOutput.HumanSize(q.Size)} ({q.Size} bytes)");
        o.WriteLine($"disk size: {ImgOutput.HumanSize((ulong)HostFile.AllocatedBytes(path))}");
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
            ImgOutput.WriteSnapshotTable(o, Qcow2Snapshots.Read(q, out _));
        }
        o.WriteLine("Format specific information:");
        o.WriteLine($"    compat: {(h.Version >= 3 ? "1.1" : "0.10")}");
        o.WriteLine($"    compression type: {(h.CompressionType == 1 ? "zstd" : "zlib")}");
        if (h.Version >= 3)
        {
            o.WriteLine($"    lazy refcounts: {ImgOutput.Bool((h.Compatible & Qcow2Const.CompatLazyRefcounts) != 0)}");
            o.WriteLine($"    refcount bits: {h.RefcountBits}");
            o.WriteLine($"    corrupt: {ImgOutput.Bool((h.Incompatible & Qcow2Const.IncompatCorrupt) != 0)}");
            o.WriteLine($"    extended l2: {ImgOutput.Bool(h.ExtendedL2)}");
        }
        else o.WriteLine($"    refcount bits: {h.RefcountBits}");
    }

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
}
