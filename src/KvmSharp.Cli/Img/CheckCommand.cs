using System.Text;
using System.Text.Json;
using KvmSharp.Images;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Cli.Img;

/// <summary><c>img check</c>: consistency check and repair of a qcow2 image, with qemu-img check's output and exit codes.</summary>
internal static class CheckCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["f", "output", "r", "T", "object"];
    private static readonly string[] Flags = ["q", "U", "image-opts", "force-share"];

    public static int Run(string[] args, TextWriter o, TextWriter e)
    {
        var a = ImgArgs.Parse(args, OptionsWithValue, Flags);
        string path = a.One("image");
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
        using (var q = OpenForCheck(path, mode != Qcow2Check.RepairMode.None, a.ForceShare))
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
                o.WriteLine(string.Create(ImgOutput.Inv, $"{r.AllocatedClusters}/{r.TotalClusters} = {al:F2}% allocated, {fr:F2}% fragmented, {co:F2}% compressed clusters"));
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
}
