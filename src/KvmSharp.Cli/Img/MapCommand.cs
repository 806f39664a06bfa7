using System.Globalization;
using KvmSharp.Images;

namespace KvmSharp.Cli.Img;

/// <summary><c>img map</c>: the allocation map of an image and its backing chain (qemu-img map).</summary>
internal static class MapCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["f", "output", "start-offset", "max-length", "object"];
    private static readonly string[] Flags = ["U", "image-opts", "force-share"];

    public static int Run(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, OptionsWithValue, Flags);
        string path = a.One("image");
        string output = a.Get("output") ?? "human";
        using var dev = BlockDeviceFactory.Open(path, true, a.Get("f"), openBacking: true, forceShare: a.ForceShare);
        if (output == "json")
        {
            bool first = true;
            o.Write('[');
            foreach (var e in ChainExtent.Walk(dev))
            {
                if (!first) o.Write(",\n");
                first = false;
                o.Write(string.Create(CultureInfo.InvariantCulture,
                    $"{{ \"start\": {e.Start}, \"length\": {e.Length}, \"depth\": {e.Depth}, \"present\": {ImgOutput.Bool(e.Present)}, \"zero\": {ImgOutput.Bool(e.Zero)}, \"data\": {ImgOutput.Bool(e.Data)}"));
                if (e.HasOffset) o.Write(string.Create(CultureInfo.InvariantCulture, $", \"offset\": {e.Offset}"));
                o.Write('}');
            }
            o.WriteLine(']');
        }
        else
        {
            o.WriteLine(string.Format(CultureInfo.InvariantCulture, "{0,-16}{1,-16}{2,-16}{3}", "Offset", "Length", "Mapped to", "File"));
            foreach (var e in ChainExtent.Walk(dev))
            {
                if (!e.Data || !e.HasOffset) continue;
                o.WriteLine(string.Format(CultureInfo.InvariantCulture, "{0,-16}{1,-16}{2,-16}{3}", ImgOutput.Hex(e.Start), ImgOutput.Hex(e.Length), ImgOutput.Hex(e.Offset), e.File));
            }
        }
        return 0;
    }
}
