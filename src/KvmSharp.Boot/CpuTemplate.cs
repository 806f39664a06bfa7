using System.Globalization;
using System.Text;

namespace KvmSharp.Boot;

/// <summary>One CPUID feature bit: leaf, optional subleaf (null = every subleaf), register, bit.</summary>
public readonly record struct CpuidBit(uint Function, uint? Index, CpuidRegister Register, int Bit, string? Name = null)
{
    public override string ToString() =>
        Name ?? $"0x{Function:x}{(Index is { } i ? $".{i}" : "")}:{Register.ToString().ToLowerInvariant()}:{Bit}";
}

/// <summary>A whole CPUID leaf (or one subleaf) whose registers are all zeroed.</summary>
public readonly record struct CpuidLeaf(uint Function, uint? Index)
{
    public override string ToString() => $"0x{Function:x}{(Index is { } i ? $".{i}" : "")}";
}

/// <summary>
/// CPU features hidden from the guest (the <c>--cpu-template</c> option).
/// <para>Text form, items separated by commas: a named set, a feature name, or an explicit bit or leaf.
/// A leading '-' on an item is allowed and means the same ("remove").</para>
/// <list type="bullet">
/// <item><c>none</c> — hide nothing (the default).</item>
/// <item><c>minimal</c> — hide AVX, AVX2, AVX-512 (all), FMA, F16C, XSAVE/OSXSAVE and leaf 0xD, TSX (HLE, RTM, TSXLDTRK), MPX, PKU, AMX, AVX-VNNI, AVX512-BF16, AMD FMA4/XOP.</item>
/// <item><c>pvm</c> — <c>minimal</c> plus the instructions a PVM host's instruction emulator fails on (docs/pvm.md): CMPXCHG16B (SLUB), POPCNT, SMAP (clac/stac), RDRAND, RDSEED, RDTSCP, RDPID, AES-NI, PCLMULQDQ, SHA, ADX, BMI1/2, SSSE3, SSE4.1/4.2, GFNI, VAES, VPCLMULQDQ. On a PVM host the VMM always hides these (see <see cref="LinuxKernelArguments()"/>).</item>
/// <item>a feature name as in Linux's /proc/cpuinfo flags, e.g. <c>avx2</c>, <c>popcnt</c>, <c>smap</c> (see <see cref="KnownFeatures"/>).</item>
/// <item><c>LEAF[.SUB]:REG:BIT</c> — one bit, e.g. <c>0x7.0:ebx:5</c> (leaf and subleaf hex with 0x, or decimal; REG eax|ebx|ecx|edx; BIT 0–31). Without <c>.SUB</c> every subleaf.</item>
/// <item><c>LEAF[.SUB]</c> — zero the whole leaf, e.g. <c>0xd</c>.</item>
/// </list>
/// Example: <c>--cpu-template minimal,popcnt,0x7.0:ebx:20</c>. Removing <c>xsave</c> also removes
/// <c>osxsave</c> and leaf 0xD. On a PVM host CPUID changes are not honoured by the hardware;
/// <see cref="LinuxKernelArguments()"/> gives the equivalent <c>noxsave clearcpuid=…</c> parameters.
/// </summary>
public sealed record CpuTemplate(string Name, IReadOnlyList<CpuidBit> RemovedBits, IReadOnlyList<CpuidLeaf> ClearedLeaves)
{
    /// <summary>Feature names understood by <see cref="Parse"/> (Linux /proc/cpuinfo spelling). Initialized first: the named sets below are built from it.</summary>
    public static IReadOnlyDictionary<string, CpuidBit> KnownFeatures { get; } = BuildFeatureTable();

    public static CpuTemplate None { get; } = new("none", [], []);

    public static CpuTemplate Minimal { get; } = Build("minimal", MinimalNames, [new CpuidLeaf(0xD, null)]);

    public static CpuTemplate Pvm { get; } = Build("pvm", [.. MinimalNames, .. PvmExtraNames], [new CpuidLeaf(0xD, null)]);

    private static string[] MinimalNames => [
        "avx", "avx2", "fma", "f16c", "xsave", "osxsave",
        "avx512f", "avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw", "avx512vl",
        "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq",
        "avx512_4vnniw", "avx512_4fmaps", "avx512_vp2intersect", "avx512_fp16", "avx512_bf16", "avx_vnni",
        "hle", "rtm", "tsxldtrk", "mpx", "pku", "ospke", "amx_bf16", "amx_tile", "amx_int8",
        "fma4", "xop",
    ];

    // cx16: Linux's SLUB uses lock cmpxchg16b, which the PVM emulator does not run (docs/pvm.md).
    private static string[] PvmExtraNames => [
        "cx16", "popcnt", "smap", "rdrand", "rdseed", "rdtscp", "rdpid", "aes", "pclmulqdq", "sha_ni", "adx",
        "bmi1", "bmi2", "ssse3", "sse4_1", "sse4_2", "gfni", "vaes", "vpclmulqdq",
    ];

    private static Dictionary<string, CpuidBit> BuildFeatureTable()
    {
        var d = new Dictionary<string, CpuidBit>(StringComparer.Ordinal);
        void Add(uint leaf, uint? sub, CpuidRegister r, int bit, string name) => d[name] = new CpuidBit(leaf, sub, r, bit, name);
        const CpuidRegister Eax = CpuidRegister.Eax, Ebx = CpuidRegister.Ebx, Ecx = CpuidRegister.Ecx, Edx = CpuidRegister.Edx;
        // CPUID.1:ECX
        Add(1, null, Ecx, 0, "pni"); Add(1, null, Ecx, 1, "pclmulqdq"); Add(1, null, Ecx, 3, "monitor");
        Add(1, null, Ecx, 5, "vmx"); Add(1, null, Ecx, 9, "ssse3"); Add(1, null, Ecx, 12, "fma");
        Add(1, null, Ecx, 13, "cx16"); Add(1, null, Ecx, 17, "pcid"); Add(1, null, Ecx, 19, "sse4_1");
        Add(1, null, Ecx, 20, "sse4_2"); Add(1, null, Ecx, 21, "x2apic"); Add(1, null, Ecx, 22, "movbe");
        Add(1, null, Ecx, 23, "popcnt"); Add(1, null, Ecx, 24, "tsc_deadline_timer"); Add(1, null, Ecx, 25, "aes");
        Add(1, null, Ecx, 26, "xsave"); Add(1, null, Ecx, 27, "osxsave"); Add(1, null, Ecx, 28, "avx");
        Add(1, null, Ecx, 29, "f16c"); Add(1, null, Ecx, 30, "rdrand");
        // CPUID.1:EDX
        Add(1, null, Edx, 12, "mtrr"); Add(1, null, Edx, 16, "pat"); Add(1, null, Edx, 19, "clflush");
        // CPUID.7.0:EBX
        Add(7, 0, Ebx, 0, "fsgsbase"); Add(7, 0, Ebx, 3, "bmi1"); Add(7, 0, Ebx, 4, "hle"); Add(7, 0, Ebx, 5, "avx2");
        Add(7, 0, Ebx, 7, "smep"); Add(7, 0, Ebx, 8, "bmi2"); Add(7, 0, Ebx, 9, "erms"); Add(7, 0, Ebx, 10, "invpcid");
        Add(7, 0, Ebx, 11, "rtm"); Add(7, 0, Ebx, 14, "mpx"); Add(7, 0, Ebx, 16, "avx512f"); Add(7, 0, Ebx, 17, "avx512dq");
        Add(7, 0, Ebx, 18, "rdseed"); Add(7, 0, Ebx, 19, "adx"); Add(7, 0, Ebx, 20, "smap"); Add(7, 0, Ebx, 21, "avx512ifma");
        Add(7, 0, Ebx, 23, "clflushopt"); Add(7, 0, Ebx, 24, "clwb"); Add(7, 0, Ebx, 26, "avx512pf"); Add(7, 0, Ebx, 27, "avx512er");
        Add(7, 0, Ebx, 28, "avx512cd"); Add(7, 0, Ebx, 29, "sha_ni"); Add(7, 0, Ebx, 30, "avx512bw"); Add(7, 0, Ebx, 31, "avx512vl");
        // CPUID.7.0:ECX
        Add(7, 0, Ecx, 1, "avx512vbmi"); Add(7, 0, Ecx, 2, "umip"); Add(7, 0, Ecx, 3, "pku"); Add(7, 0, Ecx, 4, "ospke");
        Add(7, 0, Ecx, 5, "waitpkg"); Add(7, 0, Ecx, 6, "avx512_vbmi2"); Add(7, 0, Ecx, 8, "gfni"); Add(7, 0, Ecx, 9, "vaes");
        Add(7, 0, Ecx, 10, "vpclmulqdq"); Add(7, 0, Ecx, 11, "avx512_vnni"); Add(7, 0, Ecx, 12, "avx512_bitalg");
        Add(7, 0, Ecx, 14, "avx512_vpopcntdq"); Add(7, 0, Ecx, 16, "la57"); Add(7, 0, Ecx, 22, "rdpid");
        Add(7, 0, Ecx, 27, "movdiri"); Add(7, 0, Ecx, 28, "movdir64b");
        // CPUID.7.0:EDX
        Add(7, 0, Edx, 2, "avx512_4vnniw"); Add(7, 0, Edx, 3, "avx512_4fmaps"); Add(7, 0, Edx, 8, "avx512_vp2intersect");
        Add(7, 0, Edx, 14, "serialize"); Add(7, 0, Edx, 16, "tsxldtrk"); Add(7, 0, Edx, 22, "amx_bf16");
        Add(7, 0, Edx, 23, "avx512_fp16"); Add(7, 0, Edx, 24, "amx_tile"); Add(7, 0, Edx, 25, "amx_int8");
        // CPUID.7.1:EAX
        Add(7, 1, Eax, 4, "avx_vnni"); Add(7, 1, Eax, 5, "avx512_bf16");
        // CPUID.0xD.1:EAX
        Add(0xD, 1, Eax, 0, "xsaveopt"); Add(0xD, 1, Eax, 1, "xsavec"); Add(0xD, 1, Eax, 2, "xgetbv1"); Add(0xD, 1, Eax, 3, "xsaves");
        // CPUID.0x80000001
        Add(0x80000001, null, Ecx, 6, "sse4a"); Add(0x80000001, null, Ecx, 11, "xop"); Add(0x80000001, null, Ecx, 16, "fma4");
        Add(0x80000001, null, Ecx, 21, "tbm"); Add(0x80000001, null, Edx, 26, "pdpe1gb"); Add(0x80000001, null, Edx, 27, "rdtscp");
        return d;
    }

    /// <summary>Everything this template or <paramref name="other"/> hides: the union of their bits and
    /// leaves, named after both (<c>pvm,avx2</c>). <see cref="None"/> on either side gives the other.</summary>
    public CpuTemplate Union(CpuTemplate other)
    {
        ArgumentNullException.ThrowIfNull(other);
        if (other.RemovedBits.Count == 0 && other.ClearedLeaves.Count == 0)
            return this;
        if (RemovedBits.Count == 0 && ClearedLeaves.Count == 0)
            return other;
        return new CpuTemplate($"{Name},{other.Name}", [.. RemovedBits.Union(other.RemovedBits)], [.. ClearedLeaves.Union(other.ClearedLeaves)]);
    }

    private static CpuTemplate Build(string name, string[] names, CpuidLeaf[] leaves) =>
        new(name, [.. names.Select(n => KnownFeatures[n])], leaves);

    /// <summary>Parses <c>--cpu-template</c> text (see the type's remarks). Null or blank means <see cref="None"/>.</summary>
    /// <exception cref="FormatException">An item is not a set name, feature name, bit or leaf.</exception>
    public static CpuTemplate Parse(string? text)
    {
        if (string.IsNullOrWhiteSpace(text))
            return None;
        var bits = new List<CpuidBit>();
        var leaves = new List<CpuidLeaf>();
        var names = new List<string>();
        foreach (string raw in text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            string item = raw.StartsWith('-') ? raw[1..] : raw;
            string lower = item.ToLowerInvariant();
            names.Add(lower);
            switch (lower)
            {
                case "none":
                    continue;
                case "minimal":
                    bits.AddRange(Minimal.RemovedBits);
                    leaves.AddRange(Minimal.ClearedLeaves);
                    continue;
                case "pvm":
                    bits.AddRange(Pvm.RemovedBits);
                    leaves.AddRange(Pvm.ClearedLeaves);
                    continue;
            }
            if (KnownFeatures.TryGetValue(lower.Replace('-', '_'), out var f))
            {
                bits.Add(f);
                if (f.Name == "xsave")
                {
                    bits.Add(KnownFeatures["osxsave"]);
                    leaves.Add(new CpuidLeaf(0xD, null));
                }
                continue;
            }
            string[] parts = lower.Split(':');
            if ((parts.Length == 1 || parts.Length == 3) && TryParseLeaf(parts[0], out uint leaf, out uint? sub))
            {
                if (parts.Length == 1)
                {
                    leaves.Add(new CpuidLeaf(leaf, sub));
                    continue;
                }
                CpuidRegister? reg = parts[1] switch
                {
                    "eax" => CpuidRegister.Eax,
                    "ebx" => CpuidRegister.Ebx,
                    "ecx" => CpuidRegister.Ecx,
                    "edx" => CpuidRegister.Edx,
                    _ => null,
                };
                if (reg is { } r && int.TryParse(parts[2], NumberStyles.None, CultureInfo.InvariantCulture, out int bit) && bit < 32)
                {
                    bits.Add(new CpuidBit(leaf, sub, r, bit));
                    continue;
                }
            }
            throw new FormatException($"CPU template item '{raw}' is not 'none', 'minimal', 'pvm', a known feature name, LEAF[.SUB]:REG:BIT or LEAF[.SUB].");
        }
        return new CpuTemplate(string.Join(',', names), [.. bits.Distinct()], [.. leaves.Distinct()]);
    }

    private static bool TryParseLeaf(string s, out uint leaf, out uint? sub)
    {
        sub = null;
        int dot = s.IndexOf('.', StringComparison.Ordinal);
        string l = dot < 0 ? s : s[..dot];
        if (!TryParseNumber(l, out leaf))
            return false;
        if (dot >= 0)
        {
            if (!TryParseNumber(s[(dot + 1)..], out uint si))
                return false;
            sub = si;
        }
        return true;
    }

    private static bool TryParseNumber(string s, out uint v) =>
        s.StartsWith("0x", StringComparison.Ordinal)
            ? uint.TryParse(s.AsSpan(2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out v)
            : uint.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out v);

    /// <summary>Clears the template's bits and leaves in <paramref name="entries"/>.</summary>
    internal void Apply(List<CpuidEntry> entries)
    {
        for (int i = 0; i < entries.Count; i++)
        {
            var e = entries[i];
            foreach (var leaf in ClearedLeaves)
            {
                if (e.Function == leaf.Function && (leaf.Index is null || leaf.Index == e.Index))
                    e = e with { Eax = 0, Ebx = 0, Ecx = 0, Edx = 0 };
            }
            foreach (var b in RemovedBits)
            {
                if (e.Function == b.Function && (b.Index is null || b.Index == e.Index))
                    e = e.With(b.Register, e.Get(b.Register) & ~(1u << b.Bit));
            }
            entries[i] = e;
        }
    }

    /// <summary>
    /// Linux cpufeatures.h word number for a CPUID register (6.1 layout), so that a removed bit can be
    /// passed as <c>clearcpuid=word*32+bit</c>; null for registers Linux does not keep as a word.
    /// </summary>
    internal static int? LinuxFeatureWord(CpuidBit b) => (b.Function, b.Index, b.Register) switch
    {
        (1, _, CpuidRegister.Edx) => 0,
        (0x80000001, _, CpuidRegister.Edx) => 1,
        (1, _, CpuidRegister.Ecx) => 4,
        (0x80000001, _, CpuidRegister.Ecx) => 6,
        (7, 0, CpuidRegister.Ebx) => 9,
        (0xD, 1, CpuidRegister.Eax) => 10,
        (7, 1, CpuidRegister.Eax) => 12,
        (0x80000008, _, CpuidRegister.Ebx) => 13,
        (7, 0, CpuidRegister.Ecx) => 16,
        (7, 0, CpuidRegister.Edx) => 18,
        _ => null,
    };

    /// <summary>Longest clearcpuid= value Linux reads: cpu_parse_early_param() copies it into char arg[128].</summary>
    public const int LinuxClearCpuidMaxLength = 127;

    /// <summary>
    /// Features Linux clears by itself once XSAVE is gone (arch/x86/kernel/cpu/cpuid-deps.c: they depend
    /// on XSAVE directly or through AVX/AVX512F), so <c>noxsave</c> covers them and they need no number.
    /// </summary>
    private static readonly HashSet<string> ImpliedByNoXsave = new(StringComparer.Ordinal)
    {
        "xsave", "osxsave", "xsaveopt", "xsavec", "xsaves", "xgetbv1", "avx", "avx2", "fma", "pku", "mpx", "avx_vnni",
        "avx512f", "avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw", "avx512vl",
        "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq",
        "avx512_4vnniw", "avx512_4fmaps", "avx512_vp2intersect", "avx512_fp16", "avx512_bf16",
    };

    /// <summary>
    /// Kernel parameters that take the same features away inside the guest, for hosts (PVM) where
    /// CPUID shaping does not reach the hardware: <c>noxsave</c> when XSAVE is removed (Linux then
    /// clears everything that depends on it), and <c>clearcpuid=</c> with Linux feature numbers
    /// (word * 32 + bit, 6.1 cpufeatures.h layout) for the rest. Empty when nothing applies.
    /// </summary>
    public string LinuxKernelArguments() => LinuxKernelArguments(out _);

    /// <summary>
    /// As <see cref="LinuxKernelArguments()"/>; <paramref name="omitted"/> lists removed bits that could
    /// not be expressed: registers Linux keeps no word for, and numbers beyond the
    /// <see cref="LinuxClearCpuidMaxLength"/>-character limit of clearcpuid= (lowest numbers are kept).
    /// </summary>
    public string LinuxKernelArguments(out IReadOnlyList<CpuidBit> omitted)
    {
        var left = new List<CpuidBit>();
        bool noXsave = RemovedBits.Any(b => b.Function == 1 && b.Register == CpuidRegister.Ecx && b.Bit == 26);
        var numbers = new SortedDictionary<int, CpuidBit>();
        foreach (var b in RemovedBits)
        {
            if (noXsave && b.Name is { } n && ImpliedByNoXsave.Contains(n))
                continue;
            if (LinuxFeatureWord(b) is { } w)
                numbers.TryAdd(w * 32 + b.Bit, b);
            else
                left.Add(b);
        }
        var value = new StringBuilder();
        foreach (var (number, bit) in numbers)
        {
            string item = number.ToString(CultureInfo.InvariantCulture);
            if (value.Length + (value.Length > 0 ? 1 : 0) + item.Length > LinuxClearCpuidMaxLength)
            {
                left.Add(bit);
                continue;
            }
            if (value.Length > 0)
                value.Append(',');
            value.Append(item);
        }
        omitted = left;
        var parts = new List<string>();
        if (noXsave)
            parts.Add("noxsave");
        if (value.Length > 0)
            parts.Add("clearcpuid=" + value);
        return string.Join(' ', parts);
    }
}
