using KvmSharp.Images;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Cli.Img;

/// <summary><c>img snapshot -l</c>: the internal snapshots of a qcow2 image (creating, applying and deleting them is refused).</summary>
internal static class SnapshotCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["a", "c", "d", "f", "object"];
    private static readonly string[] Flags = ["l", "q", "U", "image-opts", "force-share"];

    public static int Run(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, OptionsWithValue, Flags);
        string path = a.One("image");
        if (a.Has("a") || a.Has("c") || a.Has("d"))
            throw new ImageException(ImageErrorKind.UnsupportedFeature, path, "only 'snapshot -l' is supported; creating, applying and deleting internal snapshots is not");
        if (!a.Has("l")) throw ImgArgs.Bad("snapshot: one of -l, -a, -c, -d is required");
        string fmt = a.Get("f") ?? BlockDeviceFactory.Probe(path);
        if (fmt != "qcow2") return 0;
        using var q = BlockDeviceFactory.OpenQcow2(path, true, forceShare: a.ForceShare);
        var list = Qcow2Snapshots.Read(q, out _);
        if (list.Count == 0) return 0;
        o.WriteLine("Snapshot list:");
        ImgOutput.WriteSnapshotTable(o, list);
        return 0;
    }
}
