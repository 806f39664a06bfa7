using KvmSharp.Cli.Img;
using KvmSharp.Images;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Fuzz;

/// <summary>
/// Fuzz target "qcow2": the bytes are a qcow2 file. `img info` (json and human) and `img snapshot -l`
/// run on it; then it is opened read-only (no backing chain: a
/// hostile backing name must not make the fuzzer open host files), read at a few places spread over
/// the virtual disk, its snapshot table listed and checked as `img check` does; then opened
/// read-write and repaired as `img check -r all` does, and written to. The only documented outcome
/// for bad input is <see cref="ImageException"/>; anything else escapes as a crash.
/// Shared, as source, with tests/KvmSharp.Images.Tests/FuzzRegressionTests.cs.
/// </summary>
internal static class Qcow2Target
{
    private const int ReadChunk = 64 << 10;

    public static string? Run(ReadOnlySpan<byte> data, string scratchDirectory)
    {
        string path = Path.Combine(scratchDirectory, "input.qcow2");
        File.WriteAllBytes(path, data.ToArray());
        // The img front end turns OverflowException/FormatException into "img: invalid number: …",
        // which is right for command-line numbers but hides an unchecked field of the image.
        foreach (string[] args in (string[][])[["info", "--output=json", path], ["info", path], ["snapshot", "-l", path]])
        {
            var stderr = new StringWriter();
            if (ImgCommand.Run(args, TextWriter.Null, stderr) != 0 && stderr.ToString().StartsWith("img: invalid number", StringComparison.Ordinal))
                throw new InvalidOperationException($"img {args[0]} reported a number error for an image: {stderr}");
        }
        try
        {
            using (var img = BlockDeviceFactory.OpenQcow2(path, readOnly: true))
            {
                byte[] buf = new byte[ReadChunk];
                for (ulong i = 0; i < 4; i++)
                {
                    ulong offset = img.Size / 4 * i & ~511UL;
                    int len = (int)Math.Min((ulong)ReadChunk, img.Size - offset);
                    img.Read(buf.AsSpan(0, len), offset);
                }
                Qcow2Snapshots.Read(img, out _);
                Qcow2Check.Run(img, Qcow2Check.RepairMode.None);
            }
            using (var img = BlockDeviceFactory.OpenQcow2(path, readOnly: false, allowCorrupt: true))
            {
                Qcow2Check.Run(img, Qcow2Check.RepairMode.All);
                byte[] buf = new byte[4096];
                buf.AsSpan().Fill(0xa5);
                foreach (ulong offset in (ReadOnlySpan<ulong>)[0, img.Size / 2 & ~4095UL])
                {
                    if (offset + (ulong)buf.Length <= img.Size)
                        img.Write(buf, offset);
                }
                img.Flush();
            }
        }
        catch (ImageException e)
        {
            return e.Message;
        }
        return null;
    }
}
