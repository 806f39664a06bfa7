using System.Buffers.Binary;
using KvmSharp.Images.Qcow2;
using KvmSharp.Cli.Img;
using KvmSharp.Images;

namespace KvmSharp.Cli.Tests;

/// <summary>
/// Hostile images: mutated headers and tables (fixed seeds) must end in an ImageException, never another
/// exception, a hang, or a write outside the image. Modelled on Cloud Hypervisor fuzz/fuzz_targets/qcow.rs.
/// </summary>
public class HostileImageTests
{
    private const int VirtualSize = 4 << 20;

    /// <summary>Seed images of different shapes, made by qemu-img and qemu-io.</summary>
    private static string MakeSeed(TempDir d, string kind)
    {
        string p = d[kind + ".qcow2"];
        File.WriteAllBytes(d["pattern.raw"], Pattern.Make(VirtualSize, 99));
        switch (kind)
        {
            case "plain": Qemu.Img("convert", "-O", "qcow2", "-o", "cluster_size=4096", d["pattern.raw"], p); break;
            case "small": Qemu.Img("convert", "-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1", d["pattern.raw"], p); break;
            case "compressed": Qemu.Img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", d["pattern.raw"], p); break;
            case "zstd": Qemu.Img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096,compression_type=zstd", d["pattern.raw"], p); break;
            case "extl2": Qemu.Img("convert", "-O", "qcow2", "-o", "cluster_size=16384,extended_l2=on", d["pattern.raw"], p); break;
            case "v2": Qemu.Img("convert", "-O", "qcow2", "-o", "compat=0.10,cluster_size=4096", d["pattern.raw"], p); break;
            case "overlay":
                Qemu.Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "pattern.raw", "-F", "raw", p);
                Qemu.Io(p, "qcow2", "write -P 3 10000 70000", "write -z 500000 8192");
                break;
            case "snapshot":
                Qemu.Img("convert", "-O", "qcow2", "-o", "cluster_size=4096", d["pattern.raw"], p);
                Qemu.Img("snapshot", "-c", "s1", p);
                Qemu.Io(p, "qcow2", "write -P 4 0 20000");
                break;
        }
        return p;
    }

    /// <summary>Byte ranges worth mutating: header cluster, L1, refcount table, first refcount block, some L2s.</summary>
    private static List<(long Start, int Length)> MetadataRegions(byte[] img)
    {
        var regions = new List<(long, int)>();
        int cb = (int)BinaryPrimitives.ReadUInt32BigEndian(img.AsSpan(20));
        int cs = 1 << cb;
        regions.Add((0, Math.Min(cs, 512)));
        long l1 = (long)BinaryPrimitives.ReadUInt64BigEndian(img.AsSpan(40));
        int l1Size = (int)BinaryPrimitives.ReadUInt32BigEndian(img.AsSpan(36));
        regions.Add((l1, Math.Min(l1Size * 8, cs)));
        long rt = (long)BinaryPrimitives.ReadUInt64BigEndian(img.AsSpan(48));
        regions.Add((rt, Math.Min(64, cs)));
        long rb = (long)(BinaryPrimitives.ReadUInt64BigEndian(img.AsSpan((int)rt)) & Qcow2Const.OffsetMask);
        if (rb != 0) regions.Add((rb, Math.Min(cs, 256)));
        for (int i = 0; i < Math.Min(l1Size, 4); i++)
        {
            long l2 = (long)(BinaryPrimitives.ReadUInt64BigEndian(img.AsSpan((int)l1 + i * 8)) & Qcow2Const.OffsetMask);
            if (l2 != 0 && l2 + cs <= img.Length) regions.Add((l2, cs));
        }
        long snaps = (long)BinaryPrimitives.ReadUInt64BigEndian(img.AsSpan(64));
        if (snaps != 0) regions.Add((snaps, 64));
        return regions;
    }

    private static readonly ulong[] Interesting =
    {
        0, 1, 7, 8, 9, 21, 22, 63, 64, 512, 4096, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff,
        0x1_0000_0000, 0x00ff_ffff_ffff_fe00, 0x7fff_ffff_ffff_ffff, 0x8000_0000_0000_0000, ulong.MaxValue,
    };

    private static void Mutate(byte[] img, Random rnd)
    {
        var regions = MetadataRegions(img);
        int n = rnd.Next(1, 5);
        for (int i = 0; i < n; i++)
        {
            var (start, len) = regions[rnd.Next(regions.Count)];
            if (start < 0 || start >= img.Length || len <= 0) continue;
            len = (int)Math.Min(len, img.Length - start);
            int pos = (int)start + rnd.Next(len);
            switch (rnd.Next(4))
            {
                case 0: img[pos] ^= (byte)(1 << rnd.Next(8)); break;
                case 1: img[pos] = (byte)rnd.Next(256); break;
                case 2:
                    pos &= ~3;
                    if (pos + 4 <= img.Length) BinaryPrimitives.WriteUInt32BigEndian(img.AsSpan(pos), (uint)Interesting[rnd.Next(Interesting.Length)]);
                    break;
                default:
                    pos &= ~7;
                    if (pos + 8 <= img.Length)
                    {
                        ulong v = rnd.Next(3) == 0 ? (ulong)rnd.NextInt64(0, img.Length + 65536) : Interesting[rnd.Next(Interesting.Length)];
                        BinaryPrimitives.WriteUInt64BigEndian(img.AsSpan(pos), v);
                    }
                    break;
            }
        }
    }

    private static void Expect(Action a)
    {
        try { a(); }
        catch (ImageException) { }
    }

    /// <summary>Everything a user or the VMM can do with an image; only ImageException may come out.</summary>
    private static bool Exercise(string path, int seed)
    {
        var rnd = new Random(seed);
        var buf = new byte[65536];
        bool opened = false;
        Expect(() =>
        {
            using var dev = BlockDeviceFactory.Open(path, readOnly: true);
            opened = true;
            ulong size = dev.Size;
            for (ulong off = 0; off < Math.Min(size, 8UL << 20); off += (ulong)buf.Length)
                dev.Read(buf.AsSpan(0, (int)Math.Min((ulong)buf.Length, size - off)), off);
            for (int i = 0; i < 20 && size > 4096; i++)
                dev.Read(buf.AsSpan(0, 4096), (ulong)rnd.NextInt64(0, (long)(size - 4096)));
        });
        long lengthBefore = new FileInfo(path).Length;
        Expect(() =>
        {
            using var dev = BlockDeviceFactory.Open(path, readOnly: false);
            ulong size = dev.Size;
            for (int i = 0; i < 20 && size > 70000; i++)
            {
                ulong off = (ulong)rnd.NextInt64(0, (long)(size - 70000));
                if (i % 5 == 4) dev.WriteZeroes(off, 65536);
                else dev.Write(buf.AsSpan(0, rnd.Next(1, 65536)), off);
            }
            dev.Flush();
        });
        // Writes stay within the file's own region: it may grow by what the writes allocate, not without bound.
        long growth = new FileInfo(path).Length - lengthBefore;
        Assert.True(growth < 64L << 20, $"image grew by {growth} bytes");
        Expect(() =>
        {
            using var q = BlockDeviceFactory.OpenQcow2(path, readOnly: true);
            Qcow2Check.Run(q, Qcow2Check.RepairMode.None);
        });
        var o = new StringWriter();
        ImgCommand.Run(new[] { "info", "--output=json", path }, o, o);
        ImgCommand.Run(new[] { "map", "--output=json", path }, o, o);
        ImgCommand.Run(new[] { "check", "-r", "all", path }, o, o);
        ImgCommand.Run(new[] { "snapshot", "-l", path }, o, o);
        Expect(() =>
        {
            using var dev = BlockDeviceFactory.Open(path, readOnly: true);
            for (ulong off = 0; off < Math.Min(dev.Size, 1UL << 20); off += (ulong)buf.Length)
                dev.Read(buf.AsSpan(0, (int)Math.Min((ulong)buf.Length, dev.Size - off)), off);
        });
        return opened;
    }

    [Theory]
    [InlineData("plain")]
    [InlineData("small")]
    [InlineData("compressed")]
    [InlineData("zstd")]
    [InlineData("extl2")]
    [InlineData("v2")]
    [InlineData("overlay")]
    [InlineData("snapshot")]
    public async Task MutatedMetadataEndsInImageException(string kind)
    {
        Qemu.Require();
        using var d = new TempDir();
        string seedPath = MakeSeed(d, kind);
        byte[] pristine = File.ReadAllBytes(seedPath);
        const int Cases = 40;
        int opened = 0;
        for (int seed = 0; seed < Cases; seed++)
        {
            var img = (byte[])pristine.Clone();
            Mutate(img, new Random(kind.Length * 1000 + seed));
            string p = d[$"m{seed}.qcow2"];
            File.WriteAllBytes(p, img);
            var work = Task.Run(() => Exercise(p, seed), TestContext.Current.CancellationToken);
            var done = await Task.WhenAny(work, Task.Delay(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken));
            Assert.True(done == work, $"{kind} mutation seed {seed} hangs");
            try { if (await work) opened++; }
            catch (Exception e) when (e is not ImageException)
            {
                Assert.Fail($"{kind} mutation seed {seed}: {e.GetType().Name}: {e.Message}\n{e.StackTrace}");
            }
            File.Delete(p);
        }
        // The mutations must reach past the header checks often enough to exercise the table walkers.
        Assert.True(opened >= Cases / 4, $"only {opened} of {Cases} mutated images opened");
    }

    [Fact]
    public void RandomHeadersWithoutQemu()
    {
        // Structure-aware random headers: valid magic and version, random fields.
        using var d = new TempDir();
        var rnd = new Random(1234);
        for (int i = 0; i < 300; i++)
        {
            var img = new byte[rnd.Next(72, 3 * 65536)];
            rnd.NextBytes(img.AsSpan(0, Math.Min(img.Length, rnd.Next(72, 1024))));
            BinaryPrimitives.WriteUInt32BigEndian(img, Qcow2Const.Magic);
            BinaryPrimitives.WriteUInt32BigEndian(img.AsSpan(4), (uint)rnd.Next(2, 4));
            BinaryPrimitives.WriteUInt32BigEndian(img.AsSpan(20), (uint)rnd.Next(9, 22));
            if (rnd.Next(2) == 0) BinaryPrimitives.WriteUInt64BigEndian(img.AsSpan(8), 0);   // no backing
            if (rnd.Next(2) == 0) BinaryPrimitives.WriteUInt32BigEndian(img.AsSpan(32), 0);  // no encryption
            if (img.Length > 104 && rnd.Next(2) == 0)
            {
                BinaryPrimitives.WriteUInt64BigEndian(img.AsSpan(72), (ulong)rnd.Next(0, 32));
                BinaryPrimitives.WriteUInt32BigEndian(img.AsSpan(96), (uint)rnd.Next(0, 8));
                BinaryPrimitives.WriteUInt32BigEndian(img.AsSpan(100), rnd.Next(2) == 0 ? 104u : 112u);
            }
            string p = d[$"h{i}.qcow2"];
            File.WriteAllBytes(p, img);
            Exercise(p, i);
            File.Delete(p);
        }
    }

    [Fact]
    public void BackingLoopsAndDeepChainsAreRefused()
    {
        using var d = new TempDir();
        Qcow2Creator.Create(d["a.qcow2"], new Qcow2CreateOptions { Size = 1 << 20 });
        Qcow2Creator.Create(d["b.qcow2"], new Qcow2CreateOptions { Size = 1 << 20, BackingFile = "a.qcow2", BackingFormat = "qcow2" });
        using (var a = BlockDeviceFactory.OpenQcow2(d["a.qcow2"], false)) a.SetBacking("b.qcow2", "qcow2");
        var e = Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(d["b.qcow2"], true));
        Assert.Equal(ImageErrorKind.BackingChain, e.Kind);
        using (var a = BlockDeviceFactory.OpenQcow2(d["a.qcow2"], false)) a.SetBacking("a.qcow2", "qcow2");
        Assert.Equal(ImageErrorKind.BackingChain, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(d["a.qcow2"], true)).Kind);
        // A chain deeper than the cap.
        Qcow2Creator.Create(d["c0.qcow2"], new Qcow2CreateOptions { Size = 1 << 20 });
        for (int i = 1; i <= Qcow2Const.MaxBackingDepth + 1; i++)
            Qcow2Creator.Create(d[$"c{i}.qcow2"], new Qcow2CreateOptions { Size = 1 << 20, BackingFile = $"c{i - 1}.qcow2", BackingFormat = "qcow2" });
        Assert.Equal(ImageErrorKind.BackingChain, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(d[$"c{Qcow2Const.MaxBackingDepth + 1}.qcow2"], true)).Kind);
        using (BlockDeviceFactory.Open(d[$"c{Qcow2Const.MaxBackingDepth - 1}.qcow2"], true)) { }
    }

    [Fact]
    public void NamedRefusals()
    {
        using var d = new TempDir();
        Qcow2Creator.Create(d["a.qcow2"], new Qcow2CreateOptions { Size = 1 << 20 });
        byte[] good = File.ReadAllBytes(d["a.qcow2"]);
        ImageException Open(Action<byte[]> mutate)
        {
            var b = (byte[])good.Clone();
            mutate(b);
            File.WriteAllBytes(d["m.qcow2"], b);
            return Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(d["m.qcow2"], false));
        }
        var enc = Open(b => BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(32), 1));
        Assert.Equal(ImageErrorKind.UnsupportedFeature, enc.Kind);
        Assert.Contains("encryption", enc.Message, StringComparison.Ordinal);
        var df = Open(b => BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(72), Qcow2Const.IncompatDataFile));
        Assert.Contains("external data file", df.Message, StringComparison.Ordinal);
        var unk = Open(b => BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(72), 1UL << 20));
        Assert.Equal(ImageErrorKind.UnsupportedFeature, unk.Kind);
        Assert.Equal(ImageErrorKind.InvalidFormat, Open(b => BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(20), 30)).Kind);
        Assert.Equal(ImageErrorKind.Corrupt, Open(b => BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(40), 1UL << 40)).Kind);
        Assert.Equal(ImageErrorKind.InvalidFormat, Open(b => BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(24), 1UL << 62)).Kind);
        // Corrupt bit: read-only open works, read-write open is refused.
        var c = (byte[])good.Clone();
        BinaryPrimitives.WriteUInt64BigEndian(c.AsSpan(72), Qcow2Const.IncompatCorrupt);
        File.WriteAllBytes(d["c.qcow2"], c);
        using (BlockDeviceFactory.Open(d["c.qcow2"], true)) { }
        Assert.Equal(ImageErrorKind.Corrupt, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(d["c.qcow2"], false)).Kind);
    }

    [Fact]
    public void WriteThroughEntryPointingIntoMetadataMarksCorrupt()
    {
        using var d = new TempDir();
        Qcow2Creator.Create(d["a.qcow2"], new Qcow2CreateOptions { Size = 1 << 20 });
        using (var dev = BlockDeviceFactory.Open(d["a.qcow2"], false)) dev.Write(new byte[4096], 0);
        // Point the first L2 entry at the refcount table (cluster 1), with COPIED set.
        byte[] b = File.ReadAllBytes(d["a.qcow2"]);
        long l1 = (long)BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan(40));
        long l2 = (long)(BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan((int)l1)) & Qcow2Const.OffsetMask);
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan((int)l2), 65536UL | Qcow2Const.CopiedFlag);
        File.WriteAllBytes(d["a.qcow2"], b);
        byte[] reftableBefore = b.AsSpan(65536, 65536).ToArray();
        using (var dev = BlockDeviceFactory.Open(d["a.qcow2"], false))
            Assert.Equal(ImageErrorKind.Corrupt, Assert.Throws<ImageException>(() => dev.Write(new byte[512], 0)).Kind);
        byte[] after = File.ReadAllBytes(d["a.qcow2"]);
        Assert.Equal(reftableBefore, after.AsSpan(65536, 65536).ToArray());
        Assert.Equal(ImageErrorKind.Corrupt, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(d["a.qcow2"], false)).Kind);
        using (BlockDeviceFactory.Open(d["a.qcow2"], true)) { }
    }
}
