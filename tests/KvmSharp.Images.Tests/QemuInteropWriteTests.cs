using KvmSharp.Images.Qcow2;

namespace KvmSharp.Images.Tests;

/// <summary>Images we write pass qemu-img check and compare equal to the expected content.</summary>
public class QemuInteropWriteTests
{
    private static void RandomWrites(IBlockDevice dev, byte[] expect, int seed, int count, int maxLen)
    {
        var rnd = new Random(seed);
        for (int i = 0; i < count; i++)
        {
            int len = rnd.Next(1, maxLen);
            int off = rnd.Next(0, expect.Length - len);
            if (rnd.Next(8) == 0) { off &= ~511; len = Math.Max(512, len & ~511); if (off + len > expect.Length) continue; }
            int op = rnd.Next(10);
            if (op == 0)
            {
                dev.WriteZeroes((ulong)off, (ulong)len);
                expect.AsSpan(off, len).Clear();
            }
            else
            {
                var buf = new byte[len];
                rnd.NextBytes(buf);
                dev.Write(buf, (ulong)off);
                buf.CopyTo(expect, off);
            }
            if (rnd.Next(50) == 0) dev.Flush();
        }
    }

    private static void AssertQemuAgrees(TempDir d, string image, byte[] expect)
    {
        var (code, output) = Qemu.Check(image);
        Assert.True(code == 0, $"qemu-img check: {output}");
        File.WriteAllBytes(d["expect.raw"], expect);
        var cmp = Qemu.Run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", d["expect.raw"], image);
        Assert.True(cmp.Code == 0, $"qemu-img compare: {cmp.Out}{cmp.Err}");
    }

    public static TheoryData<int, int, int, bool> Layouts => new()
    {
        { 65536, 3, 16, false },
        { 512, 3, 16, false },
        { 4096, 2, 16, false },
        { 2097152, 3, 16, false },
        { 4096, 3, 1, false },
        { 4096, 3, 8, false },
        { 4096, 3, 64, false },
        { 65536, 3, 16, true },
    };

    [Theory]
    [MemberData(nameof(Layouts))]
    public void OurImagePassesQemuCheck(int clusterSize, int version, int refBits, bool extL2)
    {
        Qemu.Require();
        using var d = new TempDir();
        int size = 24 << 20;
        Qcow2Creator.Create(d["a.qcow2"], new Qcow2CreateOptions { Size = (ulong)size, ClusterSize = clusterSize, Version = version, RefcountBits = refBits, ExtendedL2 = extL2 });
        Assert.Equal(0, Qemu.Check(d["a.qcow2"]).Code);
        var expect = new byte[size];
        using (var dev = BlockDeviceFactory.Open(d["a.qcow2"], readOnly: false))
        {
            RandomWrites(dev, expect, clusterSize + version, clusterSize == 512 ? 300 : 200, 300_000);
            Pattern.AssertEqual(expect, Pattern.ReadAll(dev));
        }
        AssertQemuAgrees(d, d["a.qcow2"], expect);
        using var again = BlockDeviceFactory.Open(d["a.qcow2"], readOnly: true);
        Pattern.AssertEqual(expect, Pattern.ReadAll(again));
    }

    [Theory]
    [InlineData("raw", false)]
    [InlineData("qcow2", false)]
    [InlineData("qcow2", true)]
    public void OverlayWritesCopyOnWriteAndLeaveBaseAlone(string baseFmt, bool baseCompressed)
    {
        Qemu.Require();
        using var d = new TempDir();
        int size = 16 << 20;
        var data = Pattern.Make(size, 11);
        File.WriteAllBytes(d["base.raw"], data);
        string basePath = d["base.raw"];
        if (baseFmt == "qcow2")
        {
            basePath = d["base.qcow2"];
            if (baseCompressed) Qemu.Img("convert", "-c", "-O", "qcow2", d["base.raw"], basePath);
            else Qemu.Img("convert", "-O", "qcow2", "-o", "cluster_size=4096", d["base.raw"], basePath);
        }
        byte[] baseBefore = File.ReadAllBytes(basePath);
        Qcow2Creator.Create(d["top.qcow2"], new Qcow2CreateOptions { Size = (ulong)size, BackingFile = Path.GetFileName(basePath), BackingFormat = baseFmt });
        var expect = (byte[])data.Clone();
        using (var dev = BlockDeviceFactory.Open(d["top.qcow2"], readOnly: false))
        {
            RandomWrites(dev, expect, 5, 150, 100_000);
            Pattern.AssertEqual(expect, Pattern.ReadAll(dev));
        }
        Assert.Equal(baseBefore, File.ReadAllBytes(basePath));
        AssertQemuAgrees(d, d["top.qcow2"], expect);
    }

    [Fact]
    public void OverlayWrittenByUsThenQemuIoStaysConsistent()
    {
        Qemu.Require();
        using var d = new TempDir();
        int size = 8 << 20;
        var data = Pattern.Make(size, 12);
        File.WriteAllBytes(d["base.raw"], data);
        Qcow2Creator.Create(d["top.qcow2"], new Qcow2CreateOptions { Size = (ulong)size, ClusterSize = 4096, BackingFile = "base.raw", BackingFormat = "raw" });
        var expect = (byte[])data.Clone();
        using (var dev = BlockDeviceFactory.Open(d["top.qcow2"], readOnly: false))
            RandomWrites(dev, expect, 9, 100, 50_000);
        Qemu.Io(d["top.qcow2"], "qcow2", "write -P 0x5a 12345 100000", "write -z 3000000 200000");
        expect.AsSpan(12345, 100000).Fill(0x5a);
        expect.AsSpan(3000000, 200000).Clear();
        AssertQemuAgrees(d, d["top.qcow2"], expect);
        // …and we keep writing on top of what qemu-io wrote.
        using (var dev = BlockDeviceFactory.Open(d["top.qcow2"], readOnly: false))
            RandomWrites(dev, expect, 10, 100, 50_000);
        AssertQemuAgrees(d, d["top.qcow2"], expect);
    }

    [Fact]
    public void RefcountTableGrowsWhenImageGrows()
    {
        Qemu.Require();
        using var d = new TempDir();
        // 512-byte clusters and 64-bit refcounts: one refcount block covers only 64 clusters, one table 64 blocks.
        Qcow2Creator.Create(d["a.qcow2"], new Qcow2CreateOptions { Size = 8 << 20, ClusterSize = 512, RefcountBits = 64 });
        var expect = new byte[8 << 20];
        using (var dev = BlockDeviceFactory.Open(d["a.qcow2"], readOnly: false))
        {
            var rnd = new Random(1);
            rnd.NextBytes(expect.AsSpan(0, 3 << 20));
            dev.Write(expect.AsSpan(0, 3 << 20), 0);
        }
        AssertQemuAgrees(d, d["a.qcow2"], expect);
    }
}
