using KvmSharp.Images.Qcow2;

namespace KvmSharp.Images.Tests;

/// <summary>Reads and writes allocate nothing per request once caches are warm (style.md §6).</summary>
public class AllocationTests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void ReadWriteDoNotAllocate(bool backing)
    {
        using var d = new TempDir();
        const int Size = 64 << 20;
        if (backing)
        {
            using (var f = File.Create(d["base.raw"])) f.SetLength(Size);
        }
        Qcow2Creator.Create(d["a.qcow2"], new Qcow2CreateOptions
        {
            Size = Size, ClusterSize = 65536,
            BackingFile = backing ? "base.raw" : null, BackingFormat = backing ? "raw" : null,
        });
        using var dev = BlockDeviceFactory.Open(d["a.qcow2"], readOnly: false);
        var buf = new byte[4096];
        var rnd = new Random(1);
        void Round(int n)
        {
            for (int i = 0; i < n; i++)
            {
                ulong off = (ulong)rnd.Next(0, Size - 4096) & ~511UL;
                if ((i & 1) == 0) dev.Write(buf, off);
                else dev.Read(buf, off);
            }
        }
        Round(4000); // warm up: JIT, caches, first allocations of clusters
        long before = GC.GetAllocatedBytesForCurrentThread();
        Round(4000);
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.True(allocated == 0, $"{allocated} bytes allocated by 4000 requests");
    }
}
