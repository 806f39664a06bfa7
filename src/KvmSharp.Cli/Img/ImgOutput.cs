using System.Globalization;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Cli.Img;

/// <summary>Text shared by the img subcommands, formatted as qemu-img formats it.</summary>
internal static class ImgOutput
{
    public static readonly CultureInfo Inv = CultureInfo.InvariantCulture;

    /// <summary>JSON booleans as qemu-img prints them.</summary>
    public static string Bool(bool b) => b ? "true" : "false";

    /// <summary>qemu-img map's human offsets: 0, else 0x-prefixed lowercase hex.</summary>
    public static string Hex(ulong v) => v == 0 ? "0" : "0x" + v.ToString("x", Inv);

    /// <summary>qemu's size_to_str: three significant digits in the largest unit below 1000.</summary>
    public static string HumanSize(ulong v)
    {
        string[] suffix = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if (v < 1000) return v.ToString(Inv) + " B";
        int e = Math.ILogB(v / (1000.0 / 1024.0)) + 1;
        int i = (e - 1) / 10;
        double scaled = v / Math.Pow(2, 10 * i);
        return scaled.ToString("G3", Inv) + " " + suffix[i];
    }

    /// <summary>The snapshot list of <c>info</c> and <c>snapshot -l</c>.</summary>
    public static void WriteSnapshotTable(TextWriter o, List<Qcow2Snapshot> list)
    {
        // Columns as QEMU's bdrv_snapshot_dump: "%-9s %-17s %7s%20s%13s%11s".
        o.WriteLine(string.Format(Inv, "{0,-9} {1,-17} {2,7}{3,20}{4,13}{5,11}", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"));
        foreach (var s in list)
        {
            string date = DateTimeOffset.FromUnixTimeSeconds(s.DateSec).ToLocalTime().ToString("yyyy-MM-dd HH:mm:ss", Inv);
            ulong ms = s.VmClockNsec / 1_000_000;
            string clock = string.Format(Inv, "{0:00}:{1:00}:{2:00}.{3:000}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
            string icount = s.Icount == ulong.MaxValue ? "" : s.Icount.ToString(Inv);
            o.WriteLine(string.Format(Inv, "{0,-9} {1,-17} {2,7}{3,20}{4,13}{5,11}", s.Id, s.Name, HumanSize(s.VmStateSize), date, clock, icount));
        }
    }
}
