using KvmSharp.Fuzz;
using KvmSharp.Memory;
using Xunit;

namespace KvmSharp.Boot.Tests;

/// <summary>
/// Every input the fuzzer found (fuzz/regressions/TARGET) and every seed (fuzz/corpus/TARGET) goes
/// through the fuzz target's own code (fuzz/KvmSharp.Fuzz/*Target.cs, compiled in here) and must end
/// in success or a <see cref="BootException"/> — anything else escapes and fails the test.
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

    [Theory]
    [MemberData(nameof(Inputs))]
    public void Input_ends_in_success_or_BootException(string target, string file)
    {
        byte[] data = File.ReadAllBytes(Path.Combine(RepoRoot(), file));
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

    private static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "KvmSharp.slnx")))
            dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("KvmSharp.slnx not found above " + AppContext.BaseDirectory);
    }
}
