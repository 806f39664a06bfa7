using System.Diagnostics;
using KvmSharp.Cli.Img;
using KvmSharp.Images;

namespace KvmSharp.Cli.Tests;

/// <summary>
/// Time and memory follow what an image holds (metadata, allocated clusters, the file's real size), never
/// its virtual size: 64 TiB images, empty or with a few clusters far apart, go through map, compare,
/// convert and commit in seconds with qemu-img's results; check of a huge sparse file allocates little.
/// </summary>
public class ResourceBoundsTests
{
    /// <summary>Generous for a loaded 2-core machine; the old per-cluster walks took hours here.</summary>
    private static readonly TimeSpan Budget = TimeSpan.FromSeconds(10);

    private static (int Code, string Out, string Err, TimeSpan Took) Img(params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        var sw = Stopwatch.StartNew();
        // A runaway walk must fail the test, not hang it: the command runs on a pool thread we abandon.
        var t = Task.Run(() => ImgCommand.Run(args, o, e));
        Assert.True(t.Wait(Budget), $"img {string.Join(' ', args)} still running after {Budget.TotalSeconds} s");
        return (t.Result, o.ToString(), e.ToString(), sw.Elapsed);
    }

    private static string Ok(params string[] args)
    {
        var r = Img(args);
        Assert.True(r.Code == 0, $"img {string.Join(' ', args)} → {r.Code}: {r.Err}{r.Out}");
        return r.Out;
    }

    /// <summary>Layouts of a 64 TiB image: empty, or a few clusters far apart (data, zero, in a chain).</summary>
    public static TheoryData<string, string> Layouts => new()
    {
        { "empty", "" },
        { "far-writes", "write -P 0xab 60T 64k;write -P 0xcd 1G 128k;write -z 30T 64k" },
        { "far-writes-16k-clusters", "cluster_size=16k|write -P 0xab 60T 64k;write -P 0x11 63T 4k" },
        { "far-writes-extended-l2", "extended_l2=on|write -P 0xab 60T 2k;write -P 0xcd 1G 64k;write -z 1G 4k" },
    };

    private static string MakeImage(TempDir d, string name, string spec, string size = "64T")
    {
        string opts = spec.Contains('|', StringComparison.Ordinal) ? spec[..spec.IndexOf('|', StringComparison.Ordinal)] : "";
        string writes = spec.Contains('|', StringComparison.Ordinal) ? spec[(spec.IndexOf('|', StringComparison.Ordinal) + 1)..] : spec;
        var create = new List<string> { "create", "-q", "-f", "qcow2" };
        if (opts.Length > 0) { create.Add("-o"); create.Add(opts); }
        create.Add(d[name]);
        create.Add(size);
        Qemu.Img(create.ToArray());
        if (writes.Length > 0) Qemu.Io(d[name], "qcow2", writes.Split(';'));
        return d[name];
    }

    [Theory]
    [MemberData(nameof(Layouts))]
    public void MapCompareConvertCommitOfHugeImagesFollowTheMetadata(string layout, string spec)
    {
        _ = layout;
        Qemu.Require();
        using var d = new TempDir();
        string img = MakeImage(d, "x.qcow2", spec);

        // map: the same extents as qemu-img.
        Assert.Equal(Qemu.Img("map", "--output=json", img).Trim(), Ok("map", "--output=json", img).Trim());
        Assert.Equal(Qemu.Img("map", img).Trim(), Ok("map", img).Trim());

        // compare: against an empty twin (same verdict and offset as qemu-img) and against itself.
        string empty = MakeImage(d, "empty.qcow2", spec.Contains('|', StringComparison.Ordinal) ? spec[..spec.IndexOf('|', StringComparison.Ordinal)] + "|" : "");
        var theirs = Qemu.Run("qemu-img", "compare", img, empty);
        var ours = Img("compare", img, empty);
        Assert.Equal(theirs.Code, ours.Code);
        Assert.Equal(theirs.Out.Trim(), ours.Out.Trim());
        Assert.Equal("Images are identical.", Ok("compare", img, img).Trim());

        // convert -O qcow2: same content (qemu-img compare), consistent (qemu-img check).
        Ok("convert", "-O", "qcow2", img, d["c.qcow2"]);
        Assert.Equal(0, Qemu.Run("qemu-img", "compare", img, d["c.qcow2"]).Code);
        Assert.Equal(0, Qemu.Check(d["c.qcow2"]).Code);
        Assert.True(new FileInfo(d["c.qcow2"]).Length < 64 << 20, "the converted image holds only the written clusters");

        // commit into a 64 TiB base: what qemu-img commit gives, and the overlay is emptied.
        foreach (var who in new[] { "q", "k" })
        {
            MakeImage(d, who + "base.qcow2", "write -P 0x5a 2T 64k");
            Qemu.Img("create", "-q", "-f", "qcow2", "-b", who + "base.qcow2", "-F", "qcow2", d[who + "top.qcow2"]);
            if (spec.Length > 0 && !spec.Contains('|', StringComparison.Ordinal)) Qemu.Io(d[who + "top.qcow2"], "qcow2", spec.Split(';'));
            else Qemu.Io(d[who + "top.qcow2"], "qcow2", "write -P 0xab 60T 64k");
        }
        Qemu.Img("commit", "-q", d["qtop.qcow2"]);
        Assert.Contains("Image committed.", Ok("commit", d["ktop.qcow2"]), StringComparison.Ordinal);
        Assert.Equal(0, Qemu.Run("qemu-img", "compare", d["qbase.qcow2"], d["kbase.qcow2"]).Code);
        Assert.Equal(0, Qemu.Check(d["kbase.qcow2"]).Code);
        Assert.DoesNotContain("\"depth\": 0, \"present\": true", Qemu.Img("map", "--output=json", d["ktop.qcow2"]), StringComparison.Ordinal);
    }

    [Fact]
    public void ConvertToRawWritesASparseFile()
    {
        Qemu.Require();
        using var d = new TempDir();
        // ext4 caps files at 16 TiB, so the raw case uses 8 TiB.
        string img = MakeImage(d, "x.qcow2", "write -P 0xab 7T 64k;write -P 0xcd 1G 128k", "8T");
        Ok("convert", "-O", "raw", img, d["x.raw"]);
        Assert.Equal(8UL << 40, (ulong)new FileInfo(d["x.raw"]).Length);
        Assert.True(HostFile.AllocatedBytes(d["x.raw"]) < 16 << 20, $"raw target has {HostFile.AllocatedBytes(d["x.raw"])} bytes allocated");
        Assert.Equal(0, Qemu.Run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, d["x.raw"]).Code);
    }

    /// <summary>img on this thread, so its allocations can be measured (an upper bound of its managed memory).</summary>
    private static (int Code, string Out, string Err, long Allocated, TimeSpan Took) Measured(params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        var sw = Stopwatch.StartNew();
        long before = GC.GetAllocatedBytesForCurrentThread();
        int rc = ImgCommand.Run(args, o, e);
        return (rc, o.ToString(), e.ToString(), GC.GetAllocatedBytesForCurrentThread() - before, sw.Elapsed);
    }

    /// <summary>A qcow2 image with 512-byte clusters whose file was extended to 128 GiB (2^28 clusters, sparse),
    /// with a leak (the header's refcount raised to 2).</summary>
    private static string SparseHugeFile(TempDir d, string name)
    {
        string p = d[name];
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "128G");
        Qemu.Io(p, "qcow2", "write -P 1 0 1M", "write -P 2 100G 64k");
        using var f = File.Open(p, FileMode.Open, FileAccess.ReadWrite);
        var hdr = new byte[64];
        f.ReadExactly(hdr);
        ulong rt = System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(hdr.AsSpan(48));
        var e = new byte[8];
        f.Position = (long)rt;
        f.ReadExactly(e);
        f.Position = (long)(System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(e) & 0x00fffffffffffe00UL);
        f.Write(new byte[] { 0, 2 }); // refcount of cluster 0 (16-bit refcounts): 2, referenced once
        f.SetLength(128L << 30);
        return p;
    }

    [Fact]
    public void CheckMemoryFollowsReferencedClustersNotTheFileLength()
    {
        Qemu.Require();
        using var d = new TempDir();
        string p = SparseHugeFile(d, "sp.qcow2");
        Assert.Equal(3, Qemu.Run("qemu-img", "check", p).Code);
        // qemu-img keeps a 16-bit count for each of the 2^28 clusters (512 MiB); we keep pages where
        // something is referenced. Allocation bounds the managed memory the command used.
        var r = Measured("check", p);
        Assert.True(r.Code == 3, $"check exit {r.Code}: {r.Err}");
        Assert.Contains("Leaked cluster 0 refcount=2 reference=1", r.Err, StringComparison.Ordinal);
        Assert.True(r.Allocated < 64 << 20, $"check allocated {r.Allocated >> 20} MiB");
        r = Measured("check", "-r", "leaks", p);
        Assert.True(r.Code == 0, $"check -r leaks exit {r.Code}: {r.Err}");
        Assert.True(r.Allocated < 64 << 20, $"check -r leaks allocated {r.Allocated >> 20} MiB");
        Assert.Equal(0, Qemu.Check(p).Code);
    }

    [Fact]
    public void RefcountBlocksPastTheEndAreReportedOncePerBlock()
    {
        Qemu.Require();
        using var d = new TempDir();
        string p = SparseHugeFile(d, "pe.qcow2");
        int entries;
        using (var f = File.Open(p, FileMode.Open, FileAccess.ReadWrite))
        {
            var hdr = new byte[64];
            f.ReadExactly(hdr);
            ulong rt = System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(hdr.AsSpan(48));
            entries = (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(hdr.AsSpan(56)) * 512 / 8;
            // Every refcount table entry but the first names a block past the end of the file.
            var table = new byte[(entries - 1) * 8];
            for (int i = 0; i < entries - 1; i++)
                System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(table.AsSpan(i * 8), (1UL << 40) + (ulong)i * 512);
            f.Position = (long)rt + 8;
            f.Write(table);
        }
        var theirs = Qemu.Run("qemu-img", "check", p);
        Assert.Equal(2, theirs.Code);
        var r = Measured("check", p);
        Assert.True(r.Code == 2, $"check exit {r.Code}");
        Assert.True(r.Took < Budget, $"check took {r.Took}");
        Assert.True(r.Allocated < 64 << 20, $"check allocated {r.Allocated >> 20} MiB");
        int lines = r.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries).Length;
        Assert.True(lines <= entries + 8, $"{lines} messages for {entries} refcount table entries");
        Assert.Contains("refcount block 1 ", r.Err, StringComparison.Ordinal);

        // -r all rebuilds the dropped blocks' refcounts; qemu-img then finds nothing wrong.
        r = Measured("check", "-r", "all", p);
        Assert.True(r.Code == 0, $"check -r all exit {r.Code}: {r.Err[^Math.Min(r.Err.Length, 400)..]}{r.Out}");
        // (about 100k "Repairing" lines are formatted and kept by this test's writer: a looser bound)
        Assert.True(r.Allocated < 256 << 20, $"check -r all allocated {r.Allocated >> 20} MiB");
        var after = Qemu.Check(p);
        Assert.True(after.Code == 0, after.Out);
    }

    [Theory]
    [InlineData("-c", "-1", "Invalid request count specified")]
    [InlineData("-c", "99999999999", "Invalid request count specified")]
    [InlineData("-d", "0", "Invalid queue depth specified")]
    [InlineData("-s", "3G", "Invalid buffer size specified")]
    [InlineData("-s", "-1", "Invalid buffer size specified")]
    [InlineData("-S", "-1", "Invalid step_size specified")]
    [InlineData("-o", "-1", "Invalid offset specified")]
    [InlineData("--flush-interval", "-1", "Invalid flush interval specified")]
    [InlineData("--pattern", "300", "Invalid pattern byte specified")]
    [InlineData("--pattern", "x", "Invalid pattern byte specified")]
    public void BenchRefusesBadNumbersInOneLine(string option, string value, string message)
    {
        using var d = new TempDir();
        Ok("create", "-q", "-f", "qcow2", d["b.qcow2"], "1M");
        var r = Img("bench", option, value, d["b.qcow2"]);
        Assert.Equal(1, r.Code);
        Assert.Contains(message, r.Err, StringComparison.Ordinal);
        Assert.Single(r.Err.Trim().Split('\n'));
    }
}
