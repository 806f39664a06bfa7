using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>`kvmsharp run` end to end with a hand-made ELF guest: seconds, not minutes.</summary>
public class TinyGuestRunTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(120);

    [Theory]
    [InlineData(1, false)]
    [InlineData(1, true)]
    [InlineData(2, false)]
    [InlineData(64, false)]
    [InlineData(64, true)]
    public void GuestReachesItsFirstInstructionWithAnyCpuCountAndEntry(int cpus, bool pvh)
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        string elf = TinyElf.Write(TinyElf.DebugExitCode(0x21));
        try
        {
            string[] args = ["run", "--kernel", elf, "--memory", "64M", "--cpus", cpus.ToString(), "--debug-exit", .. (pvh ? new[] { "--pvh" } : [])];
            var (code, _, stderr) = KvmSharpProcess.RunToEnd(Timeout, args);
            Assert.True((0x21 << 1 | 1) == code, $"exit code {code}: {stderr}");
        }
        finally
        {
            File.Delete(elf);
        }
    }

    [Fact]
    public void TripleFaultEndsTheVmWithCode4AndARegisterDump()
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        // ud2 with no IDT: #UD cannot be delivered → #DF → triple fault.
        string elf = TinyElf.Write([0x0F, 0x0B]);
        try
        {
            var (code, _, stderr) = KvmSharpProcess.RunToEnd(Timeout, "run", "--kernel", elf, "--memory", "64M");
            // On a PVM host the host's emulator may report the undeliverable exception as an internal error instead.
            Assert.True(code is 4 or 5, $"exit code {code}: {stderr}");
            Assert.Contains("RIP=", stderr);
            // Intel keeps the faulting state; on AMD KVM resets the vCPU on a shutdown, and the dump says so.
            if (File.ReadAllText("/proc/cpuinfo").Contains("AuthenticAMD", StringComparison.Ordinal))
                Assert.True(stderr.Contains("ud2", StringComparison.Ordinal) || stderr.Contains("KVM resets the vCPU on a triple fault", StringComparison.Ordinal), stderr);
            else
                Assert.Contains("ud2", stderr);
        }
        finally
        {
            File.Delete(elf);
        }
    }

    [Fact]
    public void SigtermStopsTheVmCleanly()
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        string elf = TinyElf.Write([0xEB, 0xFE]); // spin forever
        try
        {
            using var p = new KvmSharpProcess(["run", "--kernel", elf, "--memory", "64M"]);
            Thread.Sleep(1500);
            Assert.Equal(0, KillTerm(p.Pid));
            Assert.True(p.WaitForExit(TimeSpan.FromSeconds(30)), "kvmsharp did not stop on SIGTERM");
            Assert.Equal(128 + 15, p.ExitCode);
            Assert.Contains("SIGTERM", p.Stderr);
        }
        finally
        {
            File.Delete(elf);
        }
    }

    private static int KillTerm(int pid)
    {
        using var kill = System.Diagnostics.Process.Start("kill", ["-TERM", pid.ToString()]);
        kill.WaitForExit();
        return kill.ExitCode;
    }
}
