using KvmSharp.Images;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Cli.Img;

/// <summary><c>img resize</c>: grows a raw or qcow2 image (shrinks a raw one with --shrink), qemu-img resize.</summary>
internal static class ResizeCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["f", "preallocation", "object"];
    private static readonly string[] Flags = ["q", "shrink", "image-opts"];

    public static int Run(string[] args, TextWriter o)
    {
        // "-1G" would parse as an option: qemu-img accepts "--" or a size as the last argument; so do we.
        string[] pre = args;
        string? sizeArg = null;
        if (args.Length >= 2 && (args[^1].StartsWith('-') || args[^1].StartsWith('+')) && args[^1].Length > 1 && char.IsDigit(args[^1][1]))
        {
            sizeArg = args[^1];
            pre = args[..^1];
        }
        var a = ImgArgs.Parse(pre, OptionsWithValue, Flags);
        if (sizeArg is null)
        {
            if (a.Positional.Count != 2) throw ImgArgs.Bad("Expecting image file name and size");
            sizeArg = a.Positional[1];
        }
        else if (a.Positional.Count != 1) throw ImgArgs.Bad("Expecting image file name and size");
        string path = a.Positional[0];
        // Parsed before the image is opened: a bad size touches nothing.
        char sign = sizeArg[0] is '+' or '-' ? sizeArg[0] : ' ';
        ulong amount = ImgArgs.ParseSize(sign == ' ' ? sizeArg : sizeArg[1..]); // <= INT64_MAX
        using var dev = BlockDeviceFactory.Open(path, false, a.Get("f"), openBacking: false);
        ulong cur = dev.Size, target;
        if (sign == '+') target = cur + amount; // both < 2^63: no wrap
        else if (sign == '-') target = amount >= cur ? 0 : cur - amount;
        else target = amount;
        if (target == 0) throw ImgArgs.Bad("New image size must be positive");
        if (target > ImgArgs.MaxSize - 511) throw ImgArgs.Bad($"Invalid image size specified. Must be between 0 and {ImgArgs.MaxSize}.");
        target = (target + 511) & ~511UL;
        if (target < cur && !a.Has("shrink"))
            throw new ImageException(ImageErrorKind.InvalidArgument, path, "Use the --shrink option to perform a shrink operation.");
        if (dev is RawImage r) r.Resize(target);
        else ((Qcow2Image)dev).Resize(target);
        if (!a.Has("q")) o.WriteLine("Image resized.");
        return 0;
    }
}
