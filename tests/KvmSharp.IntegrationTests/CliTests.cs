using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>The binary's behaviour on bad input: one clear line and a distinct exit code, never a stack trace.</summary>
public class CliTests
{
    private static readonly TimeSpan Quick = TimeSpan.FromSeconds(60);

    [Fact]
    public void VersionAndHelp()
    {
        Assets.RequireBinary();
        var (code, stdout, _) = KvmSharpProcess.RunToEnd(Quick, "--version");
        Assert.Equal(0, code);
        Assert.Matches(@"^kvmsharp \d+\.\d+\.\d+", stdout);
        (code, stdout, _) = KvmSharpProcess.RunToEnd(Quick, "--help");
        Assert.Equal(0, code);
        Assert.Contains("kvmsharp run --kernel", stdout);
        Assert.Contains("Ctrl-A x", stdout);
    }

    [Theory]
    [InlineData("run", "--help")]
    [InlineData("run", "-h")]
    [InlineData("run", "--kernel", "/nonexistent", "--cpus", "99", "--help")] // anywhere, before any check
    [InlineData("help", "run")]
    public void RunHelp(params string[] args)
    {
        Assets.RequireBinary();
        var (code, stdout, stderr) = KvmSharpProcess.RunToEnd(Quick, args);
        Assert.Equal(0, code);
        Assert.Equal("", stderr);
        Assert.StartsWith("Usage:\n  kvmsharp run --kernel FILE", stdout);
        Assert.Contains("--cpu-template", stdout);
        Assert.Contains("Exit codes:", stdout);
    }

    [Theory]
    [InlineData(new[] { "run" }, 2, "needs --kernel")]
    [InlineData(new[] { "run", "--kernel", "/nonexistent/vmlinuz" }, 1, "does not exist")]
    [InlineData(new[] { "run", "--kernel", "/etc/passwd" }, 1, "/etc/passwd")]
    [InlineData(new[] { "run", "--kernel", "/etc/passwd", "--cpus", "65" }, 2, "--cpus")]
    [InlineData(new[] { "run", "--kernel", "/etc/passwd", "--cpus", "two" }, 2, "--cpus")]
    [InlineData(new[] { "run", "--kernel", "/etc/passwd", "--memory", "12X" }, 2, "--memory")]
    [InlineData(new[] { "run", "--bogus" }, 2, "unknown option")]
    [InlineData(new[] { "frobnicate" }, 2, "unknown command")]
    public void BadArgumentsGiveOneLineAndExitCode(string[] args, int expectedCode, string expectedText)
    {
        Assets.RequireBinary();
        var (code, stdout, stderr) = KvmSharpProcess.RunToEnd(Quick, args);
        Assert.Equal(expectedCode, code);
        Assert.Contains(expectedText, stderr);
        Assert.Single(stderr.Trim().Split('\n'));
        Assert.DoesNotContain("   at ", stderr); // no stack trace
        Assert.Equal("", stdout);
    }

    [Fact]
    public void TruncatedKernelIsRefusedClearly()
    {
        Assets.RequireBinary();
        Assets.RequireFile(Assets.MinimalKernel, "run guest/build.sh");
        string truncated = Path.Combine(Path.GetTempPath(), $"kvmsharp-trunc-{Environment.ProcessId}");
        var bytes = File.ReadAllBytes(Assets.MinimalKernel);
        File.WriteAllBytes(truncated, bytes.AsSpan(0, bytes.Length / 3).ToArray());
        try
        {
            var (code, _, stderr) = KvmSharpProcess.RunToEnd(Quick, "run", "--kernel", truncated);
            Assert.Equal(1, code);
            Assert.Single(stderr.Trim().Split('\n'));
            Assert.Contains("truncated", stderr, StringComparison.OrdinalIgnoreCase);
        }
        finally
        {
            File.Delete(truncated);
        }
    }

    [Fact]
    public void MemoryTooSmallForKernelAndInitrd()
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        Assets.RequireFile(Assets.MinimalKernel, "run guest/build.sh");
        string bigInitrd = Path.Combine(Path.GetTempPath(), $"kvmsharp-big-initrd-{Environment.ProcessId}");
        File.WriteAllBytes(bigInitrd, new byte[40 << 20]);
        try
        {
            var (code, _, stderr) = KvmSharpProcess.RunToEnd(Quick, "run", "--kernel", Assets.MinimalKernel, "--initrd", bigInitrd, "--memory", "32M");
            Assert.Equal(1, code);
            Assert.Single(stderr.Trim().Split('\n'));
            Assert.Contains("too small", stderr, StringComparison.OrdinalIgnoreCase);
        }
        finally
        {
            File.Delete(bigInitrd);
        }
    }

    [Fact]
    public void CommandLineLongerThanTheKernelAccepts()
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        Assets.RequireFile(Assets.MinimalKernel, "run guest/build.sh");
        var (code, _, stderr) = KvmSharpProcess.RunToEnd(Quick, "run", "--kernel", Assets.MinimalKernel, "--cmdline", "console=ttyS0 " + new string('x', 5000));
        Assert.Equal(1, code);
        Assert.Single(stderr.Trim().Split('\n'));
        Assert.Contains("command line", stderr, StringComparison.OrdinalIgnoreCase);
    }
}
