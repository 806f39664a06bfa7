using System.Text;
using System.Text.RegularExpressions;
using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// Real boots of the test guests built by guest/build.sh. A boot costs minutes on a PVM host, so each
/// boot checks many things (style: "let one boot check many things").
/// </summary>
public class BootTests(ITestOutputHelper output)
{
    private static readonly TimeSpan BootTimeout = TimeSpan.FromMinutes(12);

    internal static string Encode(string script) => Convert.ToBase64String(Encoding.UTF8.GetBytes(script));

    private void Require(string kernel, string initrd)
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        Assets.RequireFile(kernel, "run guest/build.sh (scripts/test.sh does)");
        Assets.RequireFile(initrd, "run guest/build.sh (scripts/test.sh does)");
    }

    /// <summary>
    /// Guest (a) with 2 vCPUs: reaches init, counts and onlines 2 CPUs, reads a line typed on the
    /// host's stdin, and its reboot ends kvmsharp with exit code 0.
    /// </summary>
    [Fact]
    public void MinimalGuestBootsWithTwoCpusAndReadsStdin()
    {
        Require(Assets.MinimalKernel, Assets.Initrd);
        const string Script = """
            echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
            echo "online=$(cat /sys/devices/system/cpu/online)"
            echo "typed:"; read -r line; echo "got=[$line]"
            """;
        using var vm = new KvmSharpProcess([
            "run", "--kernel", Assets.MinimalKernel, "--initrd", Assets.Initrd, "--cpus", "2", "--memory", "256M",
            "--cmdline", $"{Assets.FastCmdline} kvmsharp.run={Encode(Script)} kvmsharp.exit=reboot"]);
        try
        {
            Assert.True(vm.WaitForOutput("KVMSHARP-READY", BootTimeout), "guest did not reach init");
            Assert.True(vm.WaitForOutput("typed:", TimeSpan.FromMinutes(3)), "guest did not start the command");
            vm.WriteInput("hello from the host\n");
            Assert.True(vm.WaitForExit(TimeSpan.FromMinutes(3)), "guest did not reboot");
        }
        finally
        {
            output.WriteLine(vm.Stdout);
            output.WriteLine(vm.Stderr);
        }
        string o = vm.Stdout;
        Assert.Contains("cpus=2", o);
        Assert.Contains("online=0-1", o);
        Assert.Contains("got=[hello from the host]", o);
        Assert.Contains("KVMSHARP-END rc=0", o);
        Assert.Equal(0, vm.ExitCode);
    }

    /// <summary>
    /// Guest (a) with 5 GiB and 2 vCPUs: the e820 map has RAM above 4 GiB (past the MMIO hole), the
    /// guest kernel counts more than 4 GiB, and user space on both vCPUs works with most of its pages
    /// above 4 GiB (the page allocator hands out the highest zone first): 200 processes, a checksum
    /// over 300 MiB that the host knows, no segfault. On the PVM host this combination made user
    /// processes crash; on hardware KVM semantics (the nested host) it must not.
    /// </summary>
    [Fact]
    public void GuestSeesMoreThanFourGiBWithTwoCpus()
    {
        Require(Assets.MinimalKernel, Assets.Initrd);
        const string Script = """
            echo "memtotal_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
            i=0; while [ $i -lt 100 ]; do /bin/busybox true || echo "fork $i failed"; i=$((i+1)); done &
            j=0; while [ $j -lt 100 ]; do /bin/busybox true || echo "fork $j failed"; j=$((j+1)); done
            wait
            mount -t tmpfs -o size=400m tmpfs /mnt
            dd if=/dev/zero of=/mnt/big bs=1M count=300 2>/dev/null
            echo "sum=$(sha256sum /mnt/big | cut -c1-64)"
            """;
        using var vm = new KvmSharpProcess([
            "run", "--kernel", Assets.MinimalKernel, "--initrd", Assets.Initrd, "--memory", "5G", "--cpus", "2",
            "--cmdline", $"{Assets.FastCmdline} kvmsharp.run={Encode(Script)} kvmsharp.exit=reboot"]);
        try
        {
            Assert.True(vm.WaitForExit(TimeSpan.FromMinutes(25)), "guest did not reboot");
        }
        finally
        {
            output.WriteLine(vm.Stdout);
            output.WriteLine(vm.Stderr);
        }
        string o = vm.Stdout;
        Assert.Matches(@"BIOS-e820: \[mem 0x0000000100000000-0x000000017fffffff\] usable", o);
        var m = Regex.Match(o, @"Memory: \d+K/(\d+)K available");
        Assert.True(m.Success, "no 'Memory: …K available' line from the guest kernel");
        long totalKb = long.Parse(m.Groups[1].Value);
        Assert.True(totalKb > 4L * 1024 * 1024, $"guest kernel counts {totalKb} kB, not more than 4 GiB");
        string zeros = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(new byte[300 << 20]));
        Assert.Contains($"sum={zeros}", o);
        Assert.DoesNotMatch(@"fork \d+ failed", o);
        Assert.DoesNotContain("segfault", o);
        Assert.Contains("KVMSHARP-END rc=0", o);
        Assert.Equal(0, vm.ExitCode);
    }

    /// <summary>Guest (a) whose init exits: the kernel panics (then reboots, panic=1): exit code 3.</summary>
    [Fact]
    public void GuestPanicGivesExitCode3()
    {
        Require(Assets.MinimalKernel, Assets.Initrd);
        using var vm = new KvmSharpProcess([
            "run", "--kernel", Assets.MinimalKernel, "--initrd", Assets.Initrd, "--memory", "256M",
            "--cmdline", $"{Assets.FastCmdline} kvmsharp.run={Encode("echo bye")} kvmsharp.exit=panic"]);
        try
        {
            Assert.True(vm.WaitForExit(BootTimeout), "guest did not end");
        }
        finally
        {
            output.WriteLine(vm.Stdout);
            output.WriteLine(vm.Stderr);
        }
        Assert.Contains("Kernel panic - not syncing", vm.Stdout);
        Assert.Equal(3, vm.ExitCode);
    }
}
