using System.Diagnostics;
using System.Security.Cryptography;
using KvmSharp.Cli.Img;
using KvmSharp.Images;

namespace KvmSharp.Cli.Tests;

/// <summary>
/// Careless commands that qemu-img refuses: the output is the input (under any name) or in its
/// backing chain, sizes that wrap or truncate, files that are not images at all. Each must end with
/// one error line and a non-zero exit, and leave every file byte-identical.
/// </summary>
public class UserErrorTests
{
    private static (int Code, string Out, string Err) Img(params string[] args) => ImgInProcess.Run(args);

    /// <summary>x.qcow2 (data, hard link xlink.qcow2, symbolic link xsym.qcow2), b.qcow2 ← t.qcow2, r.raw (data).</summary>
    private static TempDir MakeImages()
    {
        Qemu.Require();
        var d = new TempDir();
        Qemu.Img("create", "-q", "-f", "qcow2", d["x.qcow2"], "4M");
        Qemu.Io(d["x.qcow2"], "qcow2", "write -P 0x11 0 1M");
        Qemu.Img("create", "-q", "-f", "qcow2", d["b.qcow2"], "4M");
        Qemu.Io(d["b.qcow2"], "qcow2", "write -P 0x22 0 2M");
        Qemu.Img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", d["t.qcow2"]);
        Qemu.Io(d["t.qcow2"], "qcow2", "write -P 0x33 1M 1M");
        File.WriteAllBytes(d["r.raw"], Pattern.Make(2 << 20, 5));
        Assert.Equal(0, Qemu.Run("ln", d["x.qcow2"], d["xlink.qcow2"]).Code);
        File.CreateSymbolicLink(d["xsym.qcow2"], "x.qcow2");
        Directory.CreateDirectory(d["sub"]);
        return d;
    }

    private static Dictionary<string, string> Hashes(string dir)
    {
        var h = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var f in Directory.GetFiles(dir))
        {
            if (new FileInfo(f).LinkTarget is not null) continue;
            h[Path.GetFileName(f)] = Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(f)));
        }
        return h;
    }

    [Theory]
    // Class: the output is the input image, by name or by another name of the same file.
    [InlineData("convert -O qcow2 x.qcow2 x.qcow2")]
    [InlineData("convert -U -O qcow2 x.qcow2 xlink.qcow2")]
    [InlineData("convert -O qcow2 xsym.qcow2 sub/../x.qcow2")]
    [InlineData("convert -f raw -O raw r.raw r.raw")]
    [InlineData("convert -n -U -f raw -O raw r.raw r.raw")]
    // ... or an image of the input's backing chain.
    [InlineData("convert -O raw t.qcow2 b.qcow2")]
    [InlineData("convert -U -O qcow2 t.qcow2 b.qcow2")]
    [InlineData("convert -n -U -O qcow2 t.qcow2 b.qcow2")]
    // A new image over its own backing file, or over a file of its backing's chain.
    [InlineData("create -q -f qcow2 -b x.qcow2 -F qcow2 x.qcow2")]
    [InlineData("create -q -f qcow2 -b xlink.qcow2 -F qcow2 x.qcow2")]
    [InlineData("create -q -f qcow2 -u -b xlink.qcow2 -F qcow2 x.qcow2 4M")]
    [InlineData("create -q -f qcow2 -b t.qcow2 -F qcow2 b.qcow2")]
    // Rebasing an image onto itself or onto a chain that contains it.
    [InlineData("rebase -b t.qcow2 -F qcow2 t.qcow2")]
    [InlineData("rebase -u -b xlink.qcow2 -F qcow2 x.qcow2")]
    [InlineData("rebase -b t.qcow2 -F qcow2 b.qcow2")]
    // Sizes that wrap (2^64-1 rounded up to a sector is 0) or exceed what the format can hold.
    [InlineData("resize --shrink -f raw r.raw 18446744073709551615")]
    [InlineData("resize -f raw r.raw +18446744073709551615")]
    [InlineData("resize -f raw r.raw +9223372036854775807")]
    [InlineData("resize --shrink -f raw r.raw -18446744073709551615")]
    [InlineData("resize --shrink -f qcow2 x.qcow2 18446744073709551615")]
    [InlineData("create -q -f raw r.raw 18446744073709551615")]
    [InlineData("create -q -f raw r.raw 16E")]
    [InlineData("create -q -f qcow2 r.raw 18446744073709551615")]
    [InlineData("create -q -f qcow2 r.raw 64P")]
    [InlineData("create -q -f qcow2 -o cluster_size=512 r.raw 64T")]
    [InlineData("create -q -f qcow2 -o cluster_size=4294967808 r.raw 1M")]
    [InlineData("create -q -f qcow2 -o cluster_size=1.5k r.raw 1M")]
    [InlineData("bench -q -w -s 4294967808 -c 1 r.raw")]
    [InlineData("bench -q -w -c -1 r.raw")]
    public void RefusedWithOneLineAndNoFileChanged(string command)
    {
        using var d = MakeImages();
        var before = Hashes(d.Path);
        // File names are made absolute (xunit runs test classes in parallel: no changing directory).
        var args = command.Split(' ').Select(a => a.Contains(".qcow2", StringComparison.Ordinal) || a.Contains(".raw", StringComparison.Ordinal) ? d[a] : a).ToArray();
        var r = Img(args);
        Assert.True(r.Code != 0, $"img {command} succeeded: {r.Out}{r.Err}");
        var lines = r.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.True(lines.Length == 1, $"img {command}: expected one error line, got: {r.Err}");
        Assert.StartsWith("img: ", lines[0], StringComparison.Ordinal);
        Assert.Equal(before, Hashes(d.Path));
        // Nothing is left in use: the same images open for writing afterwards.
        Assert.Equal(0, Qemu.Run("qemu-io", "-f", "qcow2", "-c", "read 0 512", d["t.qcow2"]).Code);
    }

    /// <summary>The refusals are not over-eager: the same commands on distinct files work.</summary>
    [Fact]
    public void DistinctFilesStillWork()
    {
        using var d = MakeImages();
        Assert.Equal(0, Img("convert", "-O", "qcow2", d["t.qcow2"], d["out.qcow2"]).Code);
        Assert.Equal(0, Img("convert", "-O", "qcow2", d["x.qcow2"], d["out.qcow2"]).Code); // over an existing, unused image
        Assert.Equal(0, Img("create", "-q", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", d["o2.qcow2"]).Code);
        Assert.Equal(0, Img("rebase", "-b", "x.qcow2", "-F", "qcow2", d["t.qcow2"]).Code);
        Assert.Equal(0, Img("resize", "-f", "raw", d["r.raw"], "+1M").Code);
        Assert.Equal(3L << 20, new FileInfo(d["r.raw"]).Length);
        Assert.Equal(0, Img("create", "-q", "-f", "raw", d["big.raw"], "1T").Code); // sparse
        Assert.Equal(0, Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", d["big.qcow2"], "64P").Code);
        Assert.Equal(0, Qemu.Check(d["big.qcow2"]).Code);
    }

    /// <summary>A FIFO, a directory or a character device given as an image: one line, at once,
    /// from every subcommand that opens images (qemu-img: "'file' driver requires ... to be a regular file").</summary>
    [Theory]
    [InlineData("info")]
    [InlineData("info -f qcow2")]
    [InlineData("check")]
    [InlineData("map")]
    [InlineData("snapshot -l")]
    [InlineData("compare x.qcow2")]
    [InlineData("convert -O raw")]
    [InlineData("convert -O raw x.qcow2")]
    [InlineData("commit")]
    [InlineData("rebase -u -b x.qcow2")]
    [InlineData("resize")]
    [InlineData("bench -c 1")]
    [InlineData("create -f raw")]
    public void NonFilesRefused(string command)
    {
        using var d = MakeImages();
        Assert.Equal(0, Qemu.Run("mkfifo", d["p"]).Code);
        // A writer, as in `cat x.qcow2 > p &`: without it an open for reading would block.
        using var writer = Process.Start(new ProcessStartInfo("sh") { ArgumentList = { "-c", $"cat '{d["x.qcow2"]}' > '{d["p"]}'" } })!;
        try
        {
            foreach (string target in new[] { d["p"], d["sub"], "/dev/zero" })
            {
                var args = command.Split(' ').Select(a => a.EndsWith(".qcow2", StringComparison.Ordinal) ? d[a] : a).ToList();
                // The odd file is the image the command opens (the output for "convert x out").
                if (command.StartsWith("convert -O raw x", StringComparison.Ordinal)) args.Add(target);
                else if (command.StartsWith("convert", StringComparison.Ordinal)) { args.Add(target); args.Add(d["out.raw"]); }
                else if (command == "resize") { args.Add(target); args.Add("1M"); }
                else if (command == "create -f raw") { args.Add(target); args.Add("1M"); }
                else args.Add(target);
                // Opening a FIFO can block for ever: a command that tries fails the test after 10 s.
                (int Code, string Out, string Err) r = default;
                var t = new Thread(() => r = Img(args.ToArray())) { IsBackground = true };
                t.Start();
                Assert.True(t.Join(TimeSpan.FromSeconds(10)), $"img {string.Join(' ', args)} hangs");
                Assert.True(r.Code != 0, $"img {string.Join(' ', args)} succeeded");
                var lines = r.Err!.Split('\n', StringSplitOptions.RemoveEmptyEntries);
                Assert.True(lines.Length == 1, r.Err);
                Assert.Contains("not a regular file or block device", lines[0], StringComparison.Ordinal);
            }
        }
        finally
        {
            writer.Kill(entireProcessTree: true);
            writer.WaitForExit();
        }
    }
}
