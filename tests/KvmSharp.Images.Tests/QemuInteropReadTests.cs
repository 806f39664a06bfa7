namespace KvmSharp.Images.Tests;

/// <summary>Images written by qemu-img read byte-identical to `qemu-img convert -O raw`.</summary>
public class QemuInteropReadTests
{
    private const int Size = 12 * 1024 * 1024 + 4096 + 512; // not a multiple of the cluster size

    public static TheoryData<string> Options => new()
    {
        "cluster_size=512",
        "cluster_size=4096",
        "cluster_size=65536",
        "cluster_size=2097152",
        "compat=0.10",
        "compat=0.10,cluster_size=1024",
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=4",
        "refcount_bits=8",
        "refcount_bits=32",
        "refcount_bits=64",
        "lazy_refcounts=on",
        "extended_l2=on",
        "extended_l2=on,cluster_size=2097152",
        "compression_type=zstd",
    };

    [Theory]
    [MemberData(nameof(Options))]
    public void ConvertedImageReadsIdentical(string opts)
    {
        Qemu.Require();
        using var d = new TempDir();
        var data = Pattern.Make(Size, opts.GetHashCode(StringComparison.Ordinal) & 0xffff);
        File.WriteAllBytes(d["src.raw"], data);
        Qemu.Img("convert", "-f", "raw", "-O", "qcow2", "-o", opts, d["src.raw"], d["img.qcow2"]);
        using var dev = BlockDeviceFactory.Open(d["img.qcow2"], readOnly: true);
        Assert.Equal((ulong)Size, dev.Size);
        Pattern.AssertEqual(data, Pattern.ReadAll(dev));
    }

    [Theory]
    [InlineData("cluster_size=65536")]
    [InlineData("cluster_size=512")]
    [InlineData("compression_type=zstd")]
    [InlineData("compat=0.10")]
    [InlineData("cluster_size=2097152")]
    public void CompressedImageReadsIdentical(string opts)
    {
        Qemu.Require();
        using var d = new TempDir();
        var data = Pattern.Make(Size, 7);
        File.WriteAllBytes(d["src.raw"], data);
        Qemu.Img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, d["src.raw"], d["img.qcow2"]);
        using var dev = BlockDeviceFactory.Open(d["img.qcow2"], readOnly: true);
        Pattern.AssertEqual(data, Pattern.ReadAll(dev));
    }

    [Theory]
    [InlineData("raw", "")]
    [InlineData("qcow2", "")]
    [InlineData("qcow2", "extended_l2=on")]
    public void ThreeDeepChainWithQemuIoWrites(string baseFmt, string extra)
    {
        Qemu.Require();
        using var d = new TempDir();
        var data = Pattern.Make(8 << 20, 3);
        File.WriteAllBytes(d["base.raw"], data);
        string basePath = d["base.raw"];
        if (baseFmt == "qcow2")
        {
            Qemu.Img("convert", "-f", "raw", "-O", "qcow2", d["base.raw"], d["base.qcow2"]);
            basePath = d["base.qcow2"];
        }
        string o = extra.Length > 0 ? extra : "cluster_size=65536";
        // Relative backing names: resolved against the overlay's directory.
        Qemu.Img("create", "-f", "qcow2", "-o", o, "-b", Path.GetFileName(basePath), "-F", baseFmt, d["mid.qcow2"]);
        Qemu.Io(d["mid.qcow2"], "qcow2", "write -P 0xab 100000 70000", "write -z 2000000 300000", "write -P 0x11 5000000 4096");
        Qemu.Img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2", d["top.qcow2"]);
        Qemu.Io(d["top.qcow2"], "qcow2", "write -P 0xcd 150000 1000", "discard 5000000 65536", "write -P 0x22 8000000 300000");
        Qemu.Img("convert", "-O", "raw", d["top.qcow2"], d["expect.raw"]);
        using var dev = BlockDeviceFactory.Open(d["top.qcow2"], readOnly: true);
        Pattern.AssertEqual(File.ReadAllBytes(d["expect.raw"]), Pattern.ReadAll(dev));
    }

    [Fact]
    public void SnapshotImageReadsActiveLayer()
    {
        Qemu.Require();
        using var d = new TempDir();
        Qemu.Img("create", "-f", "qcow2", d["a.qcow2"], "4M");
        Qemu.Io(d["a.qcow2"], "qcow2", "write -P 0x01 0 1M");
        Qemu.Img("snapshot", "-c", "s1", d["a.qcow2"]);
        Qemu.Io(d["a.qcow2"], "qcow2", "write -P 0x02 65536 4096");
        Qemu.Img("convert", "-O", "raw", d["a.qcow2"], d["expect.raw"]);
        using var dev = BlockDeviceFactory.Open(d["a.qcow2"], readOnly: true);
        Pattern.AssertEqual(File.ReadAllBytes(d["expect.raw"]), Pattern.ReadAll(dev));
    }
}
