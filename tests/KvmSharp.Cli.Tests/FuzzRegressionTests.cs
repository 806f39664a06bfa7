using KvmSharp.Fuzz;

namespace KvmSharp.Cli.Tests;

/// <summary>
/// Every input the fuzzer found (fuzz/regressions/qcow2) and every seed (fuzz/corpus/qcow2) goes
/// through the fuzz target's own code (fuzz/KvmSharp.Fuzz/Qcow2Target.cs, compiled in here: open
/// read-only, read, list snapshots, check; open read-write, check -r all, write) and must end in
/// success or an <see cref="ImageException"/> — anything else escapes and fails the test.
/// </summary>
public class FuzzRegressionTests
{
    public static TheoryData<string> Inputs()
    {
        var data = new TheoryData<string>();
        string root = RepoRoot();
        foreach (string folder in (string[])["regressions", "corpus"])
        {
            string dir = Path.Combine(root, "fuzz", folder, "qcow2");
            if (!Directory.Exists(dir))
                continue;
            foreach (string file in Directory.GetFiles(dir).Order(StringComparer.Ordinal))
                data.Add(Path.GetRelativePath(root, file));
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(Inputs))]
    public void Input_ends_in_success_or_ImageException(string file)
    {
        using var dir = new TempDir();
        string? refusal = Qcow2Target.Run(File.ReadAllBytes(Path.Combine(RepoRoot(), file)), dir.Path);
        // The seeds are real qemu-img images: each must get through every step.
        if (file.Contains("corpus", StringComparison.Ordinal))
            Assert.Null(refusal);
    }

    private static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "KvmSharp.slnx")))
            dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("KvmSharp.slnx not found above " + AppContext.BaseDirectory);
    }
}
