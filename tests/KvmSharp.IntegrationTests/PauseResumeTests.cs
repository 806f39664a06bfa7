using System.Globalization;
using System.IO.Pipes;
using System.Text;
using System.Text.RegularExpressions;
using KvmSharp.Vmm;
using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// The VM lifecycle on a real boot, in-process (<see cref="Vm"/>): pause a booted guest, check its
/// vCPU threads use no CPU while paused, resume, and check the guest's shell answers and its clock
/// kept running across the pause.
/// </summary>
public sealed partial class PauseResumeTests(ITestOutputHelper output)
{
    private static readonly TimeSpan BootTimeout = TimeSpan.FromMinutes(4);
    private static readonly TimeSpan PauseLength = TimeSpan.FromSeconds(5);

    [GeneratedRegex(@"BEFORE up=([0-9.]+) date=([0-9]+)")]
    private static partial Regex Before();

    [GeneratedRegex(@"AFTER up=([0-9.]+) date=([0-9]+)")]
    private static partial Regex After();

    [Fact]
    public void PausedGuestUsesNoCpuAndResumesWithItsClockRunning()
    {
        Assets.RequireKvm();
        Assets.RequireFile(Assets.MinimalKernel, "run guest/build.sh (scripts/test.sh does)");
        Assets.RequireFile(Assets.Initrd, "run guest/build.sh (scripts/test.sh does)");
        const string Script = """
            echo "BEFORE up=$(cut -d' ' -f1 /proc/uptime) date=$(date +%s)"
            echo "typed:"; read -r line
            echo "AFTER up=$(cut -d' ' -f1 /proc/uptime) date=$(date +%s) got=[$line]"
            """;
        string cmdline = $"{Assets.FastCmdline} kvmsharp.run={Convert.ToBase64String(Encoding.UTF8.GetBytes(Script))} kvmsharp.exit=reboot";

        using var consoleOut = new AnonymousPipeServerStream(PipeDirection.In, HandleInheritability.None);
        using var consoleIn = new AnonymousPipeServerStream(PipeDirection.Out, HandleInheritability.None);
        var text = new StringBuilder();
        var reader = new Thread(() =>
        {
            var buf = new byte[4096];
            int n;
            while ((n = consoleOut.Read(buf)) > 0)
            {
                lock (text)
                    text.Append(Encoding.UTF8.GetString(buf, 0, n));
            }
        }) { IsBackground = true };
        reader.Start();

        using var vm = Vm.Create(new VmConfig
        {
            KernelPath = Assets.MinimalKernel,
            InitrdPath = Assets.Initrd,
            CpuCount = 2,
            MemoryBytes = 256UL << 20,
            CommandLine = cmdline,
        }, consoleOutFd: (int)consoleOut.ClientSafePipeHandle.DangerousGetHandle(), consoleInFd: (int)consoleIn.ClientSafePipeHandle.DangerousGetHandle(), diagnostics: new StringWriter());
        Assert.Equal(VmState.Configured, vm.State);
        VmExit exit = default;
        var runner = new Thread(() => exit = vm.Run()) { IsBackground = true };
        runner.Start();
        try
        {
            Assert.True(WaitFor(text, "typed:", BootTimeout), "guest did not reach the command");
            var before = Before().Match(Snapshot(text));
            Assert.True(before.Success);
            Assert.Equal(VmState.Running, vm.State);

            vm.Pause();
            Assert.Equal(VmState.Paused, vm.State);
            long vcpuTicks0 = VcpuTicks(), processTicks0 = ProcessTicks();
            var sw = System.Diagnostics.Stopwatch.StartNew();
            Thread.Sleep(PauseLength);
            long vcpuTicks = VcpuTicks() - vcpuTicks0, processTicks = ProcessTicks() - processTicks0;
            output.WriteLine($"paused {sw.Elapsed.TotalSeconds:F1} s: vCPU threads used {vcpuTicks} ticks, the whole process {processTicks} ticks (1 tick = 10 ms)");
            // Parked threads block on a monitor: nothing at all, give or take the tick they parked in.
            Assert.InRange(vcpuTicks, 0, 2);

            vm.Resume();
            Assert.Equal(VmState.Running, vm.State);
            consoleIn.Write("resumed\n"u8);
            consoleIn.Flush();
            Assert.True(WaitFor(text, "got=[resumed]", TimeSpan.FromMinutes(2)), "the guest's shell did not answer after resume");
            var after = After().Match(Snapshot(text));
            Assert.True(after.Success);
            double up = double.Parse(after.Groups[1].Value, CultureInfo.InvariantCulture) - double.Parse(before.Groups[1].Value, CultureInfo.InvariantCulture);
            long date = long.Parse(after.Groups[2].Value, CultureInfo.InvariantCulture) - long.Parse(before.Groups[2].Value, CultureInfo.InvariantCulture);
            output.WriteLine($"across the pause the guest's uptime advanced {up:F2} s and its date {date} s");
            // kvmclock follows the host's clock: the paused time is not hidden from the guest.
            Assert.True(up >= PauseLength.TotalSeconds - 0.5, $"uptime advanced only {up} s");
            Assert.True(date >= PauseLength.TotalSeconds - 1, $"date advanced only {date} s");

            Assert.True(runner.Join(TimeSpan.FromMinutes(2)), "guest did not reboot");
            Assert.Equal(VmExitKind.GuestReboot, exit.Kind);
            Assert.Equal(VmState.Stopped, vm.State);
        }
        finally
        {
            vm.RequestStop(VmExit.Of(VmExitKind.Signal, "test over", 15));
            runner.Join(TimeSpan.FromSeconds(30));
            output.WriteLine(Snapshot(text));
        }
    }

    [Fact]
    public void StopWhilePausedEndsTheVm()
    {
        Assets.RequireKvm();
        Assets.RequireFile(Assets.MinimalKernel, "run guest/build.sh (scripts/test.sh does)");
        Assets.RequireFile(Assets.Initrd, "run guest/build.sh (scripts/test.sh does)");
        using var consoleOut = new AnonymousPipeServerStream(PipeDirection.In, HandleInheritability.None);
        using var consoleIn = new AnonymousPipeServerStream(PipeDirection.Out, HandleInheritability.None);
        var text = new StringBuilder();
        var reader = new Thread(() =>
        {
            var buf = new byte[4096];
            int n;
            while ((n = consoleOut.Read(buf)) > 0)
            {
                lock (text)
                    text.Append(Encoding.UTF8.GetString(buf, 0, n));
            }
        }) { IsBackground = true };
        reader.Start();
        using var vm = Vm.Create(new VmConfig
        {
            KernelPath = Assets.MinimalKernel,
            InitrdPath = Assets.Initrd,
            CpuCount = 2,
            MemoryBytes = 256UL << 20,
            CommandLine = Assets.FastCmdline + " kvmsharp.exit=shell",
        }, consoleOutFd: (int)consoleOut.ClientSafePipeHandle.DangerousGetHandle(), consoleInFd: (int)consoleIn.ClientSafePipeHandle.DangerousGetHandle(), diagnostics: new StringWriter());
        VmExit exit = default;
        var runner = new Thread(() => exit = vm.Run()) { IsBackground = true };
        runner.Start();
        Thread.Sleep(2000); // somewhere in the kernel's boot
        vm.Pause();
        vm.RequestStop(VmExit.Of(VmExitKind.Signal, "stopped while paused", 15));
        Assert.True(runner.Join(TimeSpan.FromSeconds(30)), "Run did not return after a stop while paused");
        Assert.Equal(VmExitKind.Signal, exit.Kind);
        Assert.Equal(VmState.Stopped, vm.State);
    }

    private static string Snapshot(StringBuilder text)
    {
        lock (text)
            return text.ToString();
    }

    private static bool WaitFor(StringBuilder text, string marker, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < deadline)
        {
            if (Snapshot(text).Contains(marker, StringComparison.Ordinal))
                return true;
            Thread.Sleep(50);
        }
        return false;
    }

    /// <summary>utime + stime (clock ticks) of this process's threads named vcpuN (proc(5): /proc/pid/task/tid/stat).</summary>
    private static long VcpuTicks()
    {
        long sum = 0;
        foreach (string task in Directory.GetDirectories("/proc/self/task"))
        {
            try
            {
                if (File.ReadAllText(Path.Combine(task, "comm")).StartsWith("vcpu", StringComparison.Ordinal))
                    sum += Ticks(File.ReadAllText(Path.Combine(task, "stat")));
            }
            catch (IOException)
            {
                // the thread ended
            }
        }
        return sum;
    }

    private static long ProcessTicks() => Ticks(File.ReadAllText("/proc/self/stat"));

    private static long Ticks(string stat)
    {
        // Fields after the ")" that closes comm: state is field 3, utime 14, stime 15.
        string[] f = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        return long.Parse(f[11], CultureInfo.InvariantCulture) + long.Parse(f[12], CultureInfo.InvariantCulture);
    }
}
