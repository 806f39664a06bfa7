using System.Diagnostics;
using System.Globalization;
using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// A disk fsync storm in the guest must not delay the console (issue 9: the I/O thread serves
/// the console while each disk has its own worker). The guest runs <c>dd … conv=fsync</c> on
/// /dev/vda (virtio-pci, write-back: every iteration is a FLUSH, so an fsync on the host) in a
/// loop and answers every line it reads on hvc0 (virtio-console) with "pong N"; the host sends
/// "N", waits for the answer and records the round trip. The disk image lives on the repo's
/// file system (in the nested host a 9p mount, so each fsync reaches the real disk). Reports the distribution
/// (median, p90, max) on the test output and in out/echo-latency.txt; set KVMSHARP_BIN to
/// compare another build.
/// </summary>
public class ConsoleLatencyTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Step = TimeSpan.FromMinutes(10);

    [Theory]
    [InlineData("raw")]
    [InlineData("qcow2")] // each write allocates a fresh cluster: metadata writes and ordered fsyncs per FLUSH
    public void ConsoleEchoStaysFastDuringADiskFsyncStorm(string format)
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        Assets.RequireFile(Assets.MinimalKernel, "run guest/build.sh");
        Assets.RequireFile(Assets.Initrd, "run guest/build.sh");
        Assets.RequireFile("/usr/bin/qemu-img", "apt-get install qemu-utils (scripts/setup.sh does)");

        const int Pings = 40;
        // On the repo's file system, not TMPDIR: in the nested host TMPDIR is a tmpfs, where fsync costs nothing.
        string work = Path.Combine(Assets.RepoRoot, "out", $"echo-{Environment.ProcessId}");
        Directory.CreateDirectory(work);
        string disk = Path.Combine(work, "storm." + format);
        if (format == "raw")
            File.WriteAllBytes(disk, new byte[64 << 20]);
        else
            HostShell.Run($"qemu-img create -q -f qcow2 {disk} 64M");
        try
        {
            string script = $"""
                exec 3< /dev/hvc0
                stty -F /dev/hvc0 -echo
                for i in 1 2 3; do read -r l <&3; echo "pong $l" > /dev/hvc0; done
                echo "QUIET-DONE"
                ( i=0; while :; do dd if=/dev/zero of=/dev/vda bs=65536 count=1 seek=$i conv=fsync 2>/dev/null; echo x >> /tmp/n; i=$(( (i + 1) % 1000 )); done ) &
                sleep 2; echo "STORM-ON"
                while read -r l <&3; do echo "pong $l" > /dev/hvc0; [ "$l" = s{Pings} ] && break; done
                echo "fsyncs=$(wc -l < /tmp/n)"
                kill $! 2>/dev/null; echo "ECHO-DONE"
                """;
            using var vm = new KvmSharpProcess([
                "run", "--kernel", Assets.MinimalKernel, "--initrd", Assets.Initrd, "--memory", "256M", "--console", "virtio",
                "--disk", $"{disk},id=storm",
                "--cmdline", $"{Assets.FastCmdline} kvmsharp.run={BootTests.Encode(script)} kvmsharp.exit=poweroff"]);
            try
            {
                Assert.True(vm.WaitForOutput("KVMSHARP-READY", Step), "guest did not start its script");
                Thread.Sleep(1000);
                var quiet = new List<double>();
                for (int i = 1; i <= 3; i++)
                    quiet.Add(RoundTrip(vm, $"q{i}"));
                Assert.True(vm.WaitForOutput("STORM-ON", Step), "storm did not start");
                var storm = new List<double>();
                for (int i = 1; i <= Pings; i++)
                    storm.Add(RoundTrip(vm, $"s{i}"));
                Assert.True(vm.WaitForOutput("ECHO-DONE", Step), "guest did not finish");
                string fsyncs = vm.Stdout.Split('\n').FirstOrDefault(l => l.StartsWith("fsyncs=", StringComparison.Ordinal))?.Trim() ?? "fsyncs=?";
                string report = string.Create(CultureInfo.InvariantCulture,
                    $"{Assets.Binary} ({format}): console echo round trip, quiet {Stats(quiet)}; during fsync storm ({Pings} pings, {fsyncs}) {Stats(storm)}");
                output.WriteLine(report);
                Directory.CreateDirectory(Path.Combine(Assets.RepoRoot, "out"));
                File.AppendAllText(Path.Combine(Assets.RepoRoot, "out", "echo-latency.txt"), report + "\n");
            }
            finally
            {
                output.WriteLine(vm.Stdout);
                output.WriteLine(vm.Stderr);
            }
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
    }

    private static double RoundTrip(KvmSharpProcess vm, string token)
    {
        string answer = $"pong {token}";
        var sw = Stopwatch.StartNew();
        vm.WriteInput(token + "\n");
        while (!vm.Stdout.Contains(answer, StringComparison.Ordinal))
        {
            Assert.True(sw.Elapsed < Step, $"no '{answer}'");
            Thread.Sleep(1);
        }
        return sw.Elapsed.TotalMilliseconds;
    }

    private static string Stats(List<double> ms)
    {
        var sorted = ms.Order().ToArray();
        double P(double q) => sorted[Math.Min(sorted.Length - 1, (int)(q * sorted.Length))];
        return string.Create(CultureInfo.InvariantCulture, $"median {P(0.5):F1} ms, p90 {P(0.9):F1} ms, max {sorted[^1]:F1} ms");
    }
}
