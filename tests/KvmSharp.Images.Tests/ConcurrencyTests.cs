using KvmSharp.Images.Qcow2;

namespace KvmSharp.Images.Tests;

/// <summary>Several threads reading and writing one image (as virtio-blk queues would) keep every byte.</summary>
public class ConcurrencyTests
{
    [Theory]
    [InlineData("qcow2", 4096)]
    [InlineData("qcow2", 65536)]
    [InlineData("raw", 0)]
    public void ParallelWritersToDisjointRangesKeepEveryByte(string fmt, int clusterSize)
    {
        using var d = new TempDir();
        const int Threads = 4;
        const int Slice = 4 << 20;
        string path = d["a.img"];
        var baseData = Pattern.Make(Threads * Slice, 8);
        File.WriteAllBytes(d["base.raw"], baseData);
        if (fmt == "raw") File.Copy(d["base.raw"], path);
        else Qcow2Creator.Create(path, new Qcow2CreateOptions { Size = (ulong)(Threads * Slice), ClusterSize = clusterSize, BackingFile = "base.raw", BackingFormat = "raw" });
        var expect = (byte[])baseData.Clone();
        using (var dev = BlockDeviceFactory.Open(path, readOnly: false))
        {
            Parallel.For(0, Threads, t =>
            {
                var rnd = new Random(t);
                var buf = new byte[70_000];
                var check = new byte[70_000];
                for (int i = 0; i < 300; i++)
                {
                    // Each thread owns one slice; the slices share L2 tables and refcount blocks.
                    int len = rnd.Next(1, buf.Length);
                    int off = t * Slice + rnd.Next(0, Slice - len);
                    rnd.NextBytes(buf.AsSpan(0, len));
                    dev.Write(buf.AsSpan(0, len), (ulong)off);
                    lock (expect) buf.AsSpan(0, len).CopyTo(expect.AsSpan(off));
                    dev.Read(check.AsSpan(0, len), (ulong)off);
                    Assert.True(check.AsSpan(0, len).SequenceEqual(buf.AsSpan(0, len)), $"thread {t} read back differs");
                    if (i % 50 == 0) dev.Flush();
                }
            });
            Pattern.AssertEqual(expect, Pattern.ReadAll(dev));
        }
        if (fmt == "qcow2" && Qemu.Run("which", "qemu-img").Code == 0)
            Assert.Equal(0, Qemu.Check(path).Code);
    }
}
