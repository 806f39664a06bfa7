using KvmSharp.Boot;
using KvmSharp.Vmm.Pvm;
using Xunit;

namespace KvmSharp.Vmm.Tests;

/// <summary>
/// On a PVM host CPUID shaping does not reach the guest, so the PVM template and the user's
/// <c>--cpu-template</c> become kernel parameters, from <see cref="CpuTemplate.LinuxKernelArguments()"/>
/// alone (docs/pvm.md).
/// </summary>
public class PvmCommandLineTests
{
    // Linux 6.1 feature numbers (word * 32 + bit) of what docs/pvm.md says a PVM host needs hidden.
    private static readonly string[] Needed =
    [
        "141", // cx16: SLUB's lock cmpxchg16b
        "151", "308", // popcnt, smap (clac/stac)
        "158", "306", // rdrand, rdseed
        "153", "129", "317", // aes, pclmulqdq, sha_ni
        "137", "147", "148", // ssse3, sse4_1, sse4_2 (ldmxcsr in kernel_fpu_begin)
    ];

    private static string Adjust(string commandLine, CpuTemplate template) => PvmCompat.AdjustCommandLine(commandLine, template, out _);

    private static string[] ClearCpuid(string commandLine) =>
        commandLine.Split(' ').Single(w => w.StartsWith("clearcpuid=", StringComparison.Ordinal))["clearcpuid=".Length..].Split(',');

    [Fact]
    public void WithoutAUserTemplateThePvmTemplateIsAppended()
    {
        string line = PvmCompat.AdjustCommandLine("console=ttyS0", CpuTemplate.None, out var omitted);
        Assert.StartsWith("console=ttyS0 noxsave clearcpuid=", line);
        Assert.Equal(CpuTemplate.Pvm.LinuxKernelArguments(), line["console=ttyS0 ".Length..]);
        Assert.Superset(Needed.ToHashSet(), ClearCpuid(line).ToHashSet());
        Assert.Empty(omitted);
    }

    [Fact]
    public void TheUsersTemplateIsMergedIn()
    {
        // sse4a is CPUID 0x80000001 ECX bit 6 = Linux word 6 → 198; the PVM template does not hide it.
        Assert.DoesNotContain("198", ClearCpuid(Adjust("quiet", CpuTemplate.None)));
        string line = Adjust("quiet", CpuTemplate.Parse("sse4a,popcnt"));
        var numbers = ClearCpuid(line);
        Assert.Contains("198", numbers);
        Assert.Superset(Needed.ToHashSet(), numbers.ToHashSet());
        Assert.Equal(numbers.Length, numbers.Distinct().Count()); // popcnt once
        Assert.True(line.Split(' ').Single(w => w.StartsWith("clearcpuid=", StringComparison.Ordinal)).Length - "clearcpuid=".Length <= CpuTemplate.LinuxClearCpuidMaxLength);
    }

    [Fact]
    public void ParametersTheUserGaveWin()
    {
        // Linux reads only the last clearcpuid=, so appending ours would undo the user's.
        Assert.Equal("root=/dev/vda clearcpuid=151 noxsave", Adjust("root=/dev/vda clearcpuid=151", CpuTemplate.None));
        Assert.Equal(1, Adjust("noxsave quiet", CpuTemplate.None).Split(' ').Count(w => w == "noxsave"));
        Assert.Equal("noxsave clearcpuid=1 x", Adjust("noxsave clearcpuid=1 x", CpuTemplate.Parse("avx2")));
    }

    [Fact]
    public void FeaturesNoParameterCanHideAreReported()
    {
        // CPUID leaf 6 (thermal/power) has no Linux feature word.
        var diagnostics = new StringWriter();
        PvmCompat.AdjustCommandLine("quiet", CpuTemplate.Parse("0x6:eax:1"), diagnostics);
        Assert.Contains("0x6:eax:1", diagnostics.ToString());
        Assert.Single(diagnostics.ToString().TrimEnd().Split('\n'));
        diagnostics = new StringWriter();
        PvmCompat.AdjustCommandLine("quiet", CpuTemplate.Parse("minimal"), diagnostics);
        Assert.Equal("", diagnostics.ToString());
    }
}
