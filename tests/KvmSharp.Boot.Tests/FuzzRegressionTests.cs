using System.Globalization;
using KvmSharp.Fuzz;
using KvmSharp.Memory;
using Xunit;

namespace KvmSharp.Boot.Tests;

/// <summary>
/// Every input the fuzzer found (fuzz/regressions/TARGET) and every seed (fuzz/corpus/TARGET) goes
/// through the fuzz target's own code (fuzz/KvmSharp.Fuzz/*Target.cs, compiled in here) and must end
/// in success or a <see cref="BootException"/> — anything else escapes and fails the test — and
/// within a CPU budget (an input must not cost far more than it holds).
/// </summary>
public class FuzzRegressionTests
{
    private static readonly string[] Targets = ["kernel", "xz", "payload"];

    public static TheoryData<string, string> Inputs()
    {
        var data = new TheoryData<string, string>();
        string root = RepoRoot();
        foreach (string target in Targets)
        {
            foreach (string folder in (string[])["regressions", "corpus"])
            {
                string dir = Path.Combine(root, "fuzz", folder, target);
                if (!Directory.Exists(dir))
                    continue;
                foreach (string file in Directory.GetFiles(dir).Order(StringComparer.Ordinal))
                    data.Add(target, Path.GetRelativePath(root, file));
            }
        }
        return data;
    }

    /// <summary>CPU budget per input: the seeds take milliseconds; the lzma payload in
    /// fuzz/regressions/payload decoded 512 MiB of garbage (6 s of CPU, 950 MB) before it was refused.</summary>
    private static readonly TimeSpan CpuBudget = TimeSpan.FromSeconds(1);

    [Theory]
    [MemberData(nameof(Inputs))]
    public void Input_ends_in_success_or_BootException_within_its_means(string target, string file)
    {
        byte[] data = File.ReadAllBytes(Path.Combine(RepoRoot(), file));
        TimeSpan cpu = ThreadCpuTime();
        Run(target, data);
        // CPU time of this thread, not wall time: other test classes run in parallel.
        Assert.InRange(ThreadCpuTime() - cpu, TimeSpan.Zero, CpuBudget);
    }

    private static void Run(string target, byte[] data)
    {
        switch (target)
        {
            case "kernel":
                using (GuestMemory memory = KernelTarget.CreateMemory())
                    KernelTarget.Run(data, memory);
                break;
            case "xz":
                XzTarget.RunXz(data);
                break;
            default:
                XzTarget.RunPayload(data);
                break;
        }
    }

    [Fact]
    public void Seeds_of_every_compression_are_accepted()
    {
        // The corpus is only worth fuzzing from if the seeds get past the header checks.
        string dir = Path.Combine(RepoRoot(), "fuzz", "corpus", "payload");
        foreach (string file in Directory.GetFiles(dir))
            Assert.Null(XzTarget.RunPayload(File.ReadAllBytes(file)));
    }

    /// <summary>utime + stime of the calling thread (proc(5): /proc/thread-self/stat fields 14 and 15, in clock ticks of 10 ms).</summary>
    private static TimeSpan ThreadCpuTime()
    {
        string stat = File.ReadAllText("/proc/thread-self/stat");
        string[] f = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        // f[0] is field 3 (state), so field n is f[n - 3].
        long ticks = long.Parse(f[11], CultureInfo.InvariantCulture) + long.Parse(f[12], CultureInfo.InvariantCulture);
        return TimeSpan.FromMilliseconds(ticks * 10);
    }

    private static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "KvmSharp.slnx")))
            dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("KvmSharp.slnx not found above " + AppContext.BaseDirectory);
    }
}
