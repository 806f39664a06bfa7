namespace KvmSharp.Images.Tests;

/// <summary>Images left in special states by QEMU, then written by us.</summary>
public class QemuInteropMixedTests
{
    [Fact]
    public void DirtyLazyRefcountImageIsRepairedBeforeWriting()
    {
        Qemu.Require();
        using var d = new TempDir();
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", d["a.qcow2"], "8M");
        // qemu-io's "abort" kills qemu-io without closing the image: the dirty bit stays set and
        // refcounts are stale (qcow2.txt "lazy_refcounts").
        Qemu.Run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "abort", d["a.qcow2"]);
        var info = Qemu.Img("info", "--output=json", d["a.qcow2"]);
        Assert.Contains("\"dirty-flag\": true", info, StringComparison.Ordinal);
        var expect = new byte[8 << 20];
        expect.AsSpan(0, 1 << 20).Fill(1);
        using (var dev = BlockDeviceFactory.Open(d["a.qcow2"], readOnly: false))
        {
            var buf = new byte[300_000];
            new Random(3).NextBytes(buf);
            dev.Write(buf, 2_000_000);
            buf.CopyTo(expect, 2_000_000);
            Pattern.AssertEqual(expect, Pattern.ReadAll(dev));
        }
        var (code, output) = Qemu.Check(d["a.qcow2"]);
        Assert.True(code == 0, output);
        Assert.Contains("\"dirty-flag\": false", Qemu.Img("info", "--output=json", d["a.qcow2"]), StringComparison.Ordinal);
        File.WriteAllBytes(d["e.raw"], expect);
        Assert.Equal(0, Qemu.Run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", d["e.raw"], d["a.qcow2"]).Code);
    }

    [Fact]
    public void PartlyAllocatedSubclustersAreCompletedFromBacking()
    {
        Qemu.Require();
        using var d = new TempDir();
        var data = Pattern.Make(8 << 20, 17);
        File.WriteAllBytes(d["base.raw"], data);
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536", "-b", "base.raw", "-F", "raw", d["top.qcow2"]);
        // 2 KiB subclusters: qemu-io allocates only some of them.
        Qemu.Io(d["top.qcow2"], "qcow2", "write -P 0x77 4096 2048", "write -z 131072 4096", "write -P 0x66 200000 10000");
        var expect = (byte[])data.Clone();
        expect.AsSpan(4096, 2048).Fill(0x77);
        expect.AsSpan(131072, 4096).Clear();
        expect.AsSpan(200000, 10000).Fill(0x66);
        using (var dev = BlockDeviceFactory.Open(d["top.qcow2"], readOnly: false))
        {
            Pattern.AssertEqual(expect, Pattern.ReadAll(dev));
            var buf = new byte[1000];
            new Random(4).NextBytes(buf);
            foreach (int off in new[] { 10000, 131072 + 100, 200500, 3_000_000 })
            {
                dev.Write(buf, (ulong)off);
                buf.CopyTo(expect, off);
            }
            Pattern.AssertEqual(expect, Pattern.ReadAll(dev));
        }
        Assert.Equal(0, Qemu.Check(d["top.qcow2"]).Code);
        File.WriteAllBytes(d["e.raw"], expect);
        var cmp = Qemu.Run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", d["e.raw"], d["top.qcow2"]);
        Assert.True(cmp.Code == 0, cmp.Out + cmp.Err);
    }

    [Fact]
    public void WritesToImageWithInternalSnapshotCopyShareClusters()
    {
        Qemu.Require();
        using var d = new TempDir();
        var data = Pattern.Make(6 << 20, 23);
        File.WriteAllBytes(d["src.raw"], data);
        Qemu.Img("convert", "-O", "qcow2", "-o", "cluster_size=4096", d["src.raw"], d["a.qcow2"]);
        Qemu.Img("snapshot", "-c", "s1", d["a.qcow2"]);
        var expect = (byte[])data.Clone();
        using (var dev = BlockDeviceFactory.Open(d["a.qcow2"], readOnly: false))
        {
            var rnd = new Random(5);
            for (int i = 0; i < 60; i++)
            {
                var buf = new byte[rnd.Next(1, 50_000)];
                rnd.NextBytes(buf);
                int off = rnd.Next(0, expect.Length - buf.Length);
                dev.Write(buf, (ulong)off);
                buf.CopyTo(expect, off);
            }
            dev.WriteZeroes(1 << 20, 1 << 20);
            expect.AsSpan(1 << 20, 1 << 20).Clear();
        }
        var (code, output) = Qemu.Check(d["a.qcow2"]);
        Assert.True(code == 0, output);
        File.WriteAllBytes(d["e.raw"], expect);
        Assert.Equal(0, Qemu.Run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", d["e.raw"], d["a.qcow2"]).Code);
        // The snapshot still holds the data of its time.
        Qemu.Img("snapshot", "-a", "s1", d["a.qcow2"]);
        Assert.Equal(0, Qemu.Run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", d["src.raw"], d["a.qcow2"]).Code);
        Assert.Equal(0, Qemu.Check(d["a.qcow2"]).Code);
    }
}
