using System.Globalization;

using KvmSharp.Images;

namespace KvmSharp.Cli.Img;

/// <summary>Minimal getopt for qemu-img syntax: short options (with or without attached values), long options, positionals.</summary>
internal sealed class ImgArgs
{
    public readonly Dictionary<string, string?> Options = new(StringComparer.Ordinal);
    public readonly List<string> Positional = new();

    /// <param name="args">The subcommand's arguments (after the subcommand's name).</param>
    /// <param name="withValue">Option names taking a value, e.g. "f", "O", "output".</param>
    /// <param name="flags">Option names without a value, e.g. "q", "U".</param>
    public static ImgArgs Parse(string[] args, string[] withValue, string[] flags)
    {
        var r = new ImgArgs();
        for (int i = 0; i < args.Length; i++)
        {
            string a = args[i];
            if (a == "--") { r.Positional.AddRange(args[(i + 1)..]); break; }
            if (a.StartsWith("--", StringComparison.Ordinal) && a.Length > 2)
            {
                string name = a[2..];
                string? val = null;
                int eq = name.IndexOf('=', StringComparison.Ordinal);
                if (eq >= 0) { val = name[(eq + 1)..]; name = name[..eq]; }
                if (Array.IndexOf(withValue, name) >= 0)
                {
                    if (val is null)
                    {
                        if (i + 1 >= args.Length) throw Bad($"option '--{name}' requires an argument");
                        val = args[++i];
                    }
                }
                else if (Array.IndexOf(flags, name) < 0) throw Bad($"unrecognized option '--{name}'");
                r.Options[name] = val;
                continue;
            }
            if (a.StartsWith('-') && a.Length > 1)
            {
                for (int j = 1; j < a.Length; j++)
                {
                    string name = a[j].ToString();
                    if (Array.IndexOf(withValue, name) >= 0)
                    {
                        string val;
                        if (j + 1 < a.Length) val = a[(j + 1)..];
                        else if (i + 1 < args.Length) val = args[++i];
                        else throw Bad($"option requires an argument -- '{name}'");
                        // -o may repeat: options accumulate, comma separated
                        r.Options[name] = name == "o" && r.Options.TryGetValue("o", out var prev) && prev is not null ? prev + "," + val : val;
                        break;
                    }
                    if (Array.IndexOf(flags, name) < 0) throw Bad($"invalid option -- '{name}'");
                    r.Options[name] = null;
                }
                continue;
            }
            r.Positional.Add(a);
        }
        return r;
    }

    public bool Has(string name) => Options.ContainsKey(name);
    public string? Get(string name) => Options.TryGetValue(name, out var v) ? v : null;

    /// <summary>-U / --force-share (qemu-img): read-only images take no write or resize lock bytes,
    /// so they open while another process writes them (at the reader's own risk).</summary>
    public bool ForceShare => Has("U") || Has("force-share");

    /// <summary>The one positional argument, else the usage error "Expecting one <paramref name="what"/> name".</summary>
    public string One(string what)
    {
        if (Positional.Count != 1) throw Bad($"Expecting one {what} name");
        return Positional[0];
    }

    public static ImageException Bad(string message) => new(ImageErrorKind.InvalidArgument, null, message);

    /// <summary>The largest size any size argument may give: qemu-img takes sizes as int64_t.</summary>
    public const ulong MaxSize = long.MaxValue;

    /// <summary>qemu size syntax: a number with optional k/K, M, G, T, P, E suffix (binary); fractions
    /// allowed. Refused, as qemu-img does, above <see cref="MaxSize"/>: callers add and round sizes,
    /// which must not wrap (18446744073709551615 rounded up to a sector is 0).</summary>
    public static ulong ParseSize(string s)
    {
        s = s.Trim();
        if (s.Length == 0) throw Bad("empty size");
        ulong mult = 1;
        char c = s[^1];
        int shift = char.ToUpperInvariant(c) switch { 'B' => 0, 'K' => 10, 'M' => 20, 'G' => 30, 'T' => 40, 'P' => 50, 'E' => 60, _ => -1 };
        if (shift >= 0) { mult = 1UL << shift; s = s[..^1]; }
        if (ulong.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out ulong n))
        {
            if (n > MaxSize / mult) throw TooLarge();
            return n * mult;
        }
        if (double.TryParse(s, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double d) && d >= 0)
        {
            double v = d * mult;
            if (!(v < 9223372036854775808.0)) throw TooLarge(); // 2^63; also NaN and infinity
            return (ulong)v;
        }
        throw Bad($"invalid size '{s}'");
    }

    private static ImageException TooLarge() => Bad($"Invalid image size specified. Must be between 0 and {MaxSize}.");

    /// <summary>A size that must fit an int (buffer sizes): range-checked, never truncated.</summary>
    public static int ParseSize(string s, string what, int min, int max)
    {
        ulong v = ParseSize(s);
        if (v < (ulong)min || v > (ulong)max) throw Bad($"Invalid {what} specified. Must be between {min} and {max}.");
        return (int)v;
    }

    /// <summary>A count: decimal, in [min, max], else one line naming the option.</summary>
    public static int ParseInt(string s, string what, int min, int max)
    {
        if (!int.TryParse(s, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out int v) || v < min || v > max)
            throw Bad($"Invalid {what} specified. Must be between {min} and {max}.");
        return v;
    }

    /// <summary>Parses "-o a=b,c=d" into pairs (qemu escapes commas by doubling; not needed for our keys).</summary>
    public static List<(string Key, string Value)> ParseOptions(string? o)
    {
        var list = new List<(string, string)>();
        if (string.IsNullOrEmpty(o)) return list;
        foreach (var part in o.Split(',', StringSplitOptions.RemoveEmptyEntries))
        {
            int eq = part.IndexOf('=', StringComparison.Ordinal);
            if (eq < 0) list.Add((part, "on"));
            else list.Add((part[..eq], part[(eq + 1)..]));
        }
        return list;
    }
}
