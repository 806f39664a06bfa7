using System.Buffers.Binary;
using KvmSharp.Cli.Img;
using KvmSharp.Images;

namespace KvmSharp.Cli.Tests;

/// <summary>
/// Metadata qemu-img refuses as corrupt is refused by every reader here too (map, convert, plain reads)
/// with one line, and <c>img check</c> reports it as corruption instead of "No errors".
/// </summary>
public class CorruptMetadataTests
{
    private static (int Code, string Out, string Err) Img(params string[] args) => ImgInProcess.Run(args);

    /// <summary>Each case: image options, and how one L2 entry or the snapshot table is damaged.</summary>
    public static TheoryData<string> Cases => new()
    {
        "unaligned-data-offset",      // qcow2.txt "Standard Cluster Descriptor": bits 9-55, cluster aligned
        "v2-zero-flag-on-data",       // bit 0 "With version 2 ... this is always 0"
        "v2-zero-flag-unallocated",
        "subcluster-allocated-and-zero", // "Extended L2 Entries": bits x and 32+x both set
        "subcluster-allocated-without-host",
        "snapshot-extra-data-huge",   // "Snapshot table entry": extra_data_size; qemu refuses over 1024
    };

    private static string Make(TempDir d, string kind)
    {
        string p = d["c.qcow2"];
        string opts = kind switch
        {
            "v2-zero-flag-on-data" or "v2-zero-flag-unallocated" => "compat=0.10",
            "subcluster-allocated-and-zero" or "subcluster-allocated-without-host" => "extended_l2=on",
            _ => "compat=1.1",
        };
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", opts, p, "1M");
        Qemu.Io(p, "qcow2", "write -P 1 0 64k");
        if (kind == "snapshot-extra-data-huge") Qemu.Img("snapshot", "-c", "s1", p);
        using var f = File.Open(p, FileMode.Open, FileAccess.ReadWrite);
        var hdr = new byte[72];
        f.ReadExactly(hdr);
        ulong l1 = BinaryPrimitives.ReadUInt64BigEndian(hdr.AsSpan(40));
        ulong l2 = ReadU64(f, l1) & 0x00fffffffffffe00UL;
        switch (kind)
        {
            case "unaligned-data-offset": WriteU64(f, l2, ReadU64(f, l2) + 512); break;
            case "v2-zero-flag-on-data": WriteU64(f, l2, ReadU64(f, l2) | 1); break;
            case "v2-zero-flag-unallocated": WriteU64(f, l2 + 8, 1); break;
            case "subcluster-allocated-and-zero": WriteU64(f, l2 + 8, 0x0000_0001_ffff_ffffUL); break;
            case "subcluster-allocated-without-host": WriteU64(f, l2 + 16 + 8, 1); break;
            case "snapshot-extra-data-huge":
                ulong snaps = BinaryPrimitives.ReadUInt64BigEndian(hdr.AsSpan(64));
                var b = new byte[4];
                BinaryPrimitives.WriteUInt32BigEndian(b, 0xffffffff);
                f.Position = (long)snaps + 36;
                f.Write(b);
                break;
        }
        return p;
    }

    private static ulong ReadU64(FileStream f, ulong off)
    {
        var b = new byte[8];
        f.Position = (long)off;
        f.ReadExactly(b);
        return BinaryPrimitives.ReadUInt64BigEndian(b);
    }

    private static void WriteU64(FileStream f, ulong off, ulong v)
    {
        var b = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, v);
        f.Position = (long)off;
        f.Write(b);
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void ReadersRefuseWhatQemuRefusesAndCheckReportsIt(string kind)
    {
        Qemu.Require();
        using var d = new TempDir();
        string p = Make(d, kind);
        // The reference: qemu-img refuses to map and to convert it.
        Assert.NotEqual(0, Qemu.Run("qemu-img", "map", "--output=json", p).Code);
        Assert.NotEqual(0, Qemu.Run("qemu-img", "convert", "-O", "raw", p, d["q.raw"]).Code);

        foreach (var args in new[] { new[] { "map", "--output=json", p }, new[] { "map", p }, new[] { "convert", "-O", "raw", p, d["k.raw"] }, new[] { "compare", p, p } })
        {
            var r = Img(args);
            Assert.True(r.Code != 0, $"img {string.Join(' ', args)} accepted corrupt metadata ({kind}): {r.Out}");
            Assert.Single(r.Err.Trim().Split('\n'));
            Assert.DoesNotContain("   at ", r.Err, StringComparison.Ordinal);
        }
        var ex = Assert.Throws<ImageException>(() =>
        {
            using var dev = BlockDeviceFactory.Open(p, readOnly: true);
            dev.Read(new byte[128 << 10], 0);
        });
        Assert.Equal(ImageErrorKind.Corrupt, ex.Kind);

        var check = Img("check", p);
        if (kind == "snapshot-extra-data-huge")
        {
            // qemu-img check cannot open it either ("Check failed"): one line, exit 1.
            Assert.Equal(1, check.Code);
            Assert.Contains("Too much extra metadata", check.Err, StringComparison.Ordinal);
            Assert.Single(check.Err.Trim().Split('\n'));
        }
        else
        {
            Assert.True(check.Code == 2, $"check exit {check.Code}: {check.Out}{check.Err}");
            Assert.Contains("ERROR", check.Err, StringComparison.Ordinal);
            Assert.DoesNotContain("No errors", check.Out, StringComparison.Ordinal);
        }
    }
}
