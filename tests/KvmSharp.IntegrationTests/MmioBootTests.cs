using System.Globalization;
using System.Security.Cryptography;
using System.Text.RegularExpressions;
using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// One boot of guest (a) with every device on the virtio-mmio transport: a qcow2 overlay (made by
/// qemu-img over a raw base) as the disk, virtio-rng, virtio-console as the console input, and the
/// balloon over prefaulted RAM. The guest reads the base through the overlay, talks on hvc0 both
/// ways, inflates the balloon (the VMM's RSS must drop), then syncs a block to the disk and the test
/// kills the VMM with SIGKILL: the synced block must be in the overlay, which qemu-img still reads.
/// </summary>
public class MmioBootTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Step = TimeSpan.FromMinutes(10);

    [Fact]
    public void MmioDevicesVirtioConsoleBalloonAndSyncedDataSurvivesSigkill()
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        Assets.RequireFile(Assets.MinimalKernel, "run guest/build.sh");
        Assets.RequireFile(Assets.Initrd, "run guest/build.sh");
        Assets.RequireFile("/usr/bin/qemu-img", "apt-get install qemu-utils (scripts/setup.sh does)");

        string work = Directory.CreateTempSubdirectory("kvmsharp-mmio").FullName;
        string baseImage = Path.Combine(work, "base.raw"), overlay = Path.Combine(work, "overlay.qcow2"), flat = Path.Combine(work, "flat.raw");
        var basePattern = new byte[8 << 20];
        "BASE-PATTERN"u8.CopyTo(basePattern);
        File.WriteAllBytes(baseImage, basePattern);
        HostShell.Run($"qemu-img create -q -f qcow2 -b {baseImage} -F raw {overlay}");
        try
        {
            // Balloon: RAM is prefaulted, so the VMM starts with all 256 MiB resident; the driver
            // inflates to 100 MiB at probe, which the VMM must give back to the host (MADV_DONTNEED).
            // Without DEFLATE_ON_OOM the inflated pages leave MemTotal (248544 kB without a balloon).
            const string Script = """
                echo "mmio=$(ls /sys/bus/platform/drivers/virtio-mmio | grep -c virtio-mmio)"
                echo "drivers=$(ls /sys/bus/virtio/drivers | tr '\n' ' ')"
                echo "rng=$(cat /sys/class/misc/hw_random/rng_current)"
                echo "base=$(dd if=/dev/vda bs=12 count=1 2>/dev/null)"
                exec 3< /dev/hvc0
                echo "hello on hvc0" > /dev/hvc0
                echo "HVC-READ"; read -r line <&3; echo "hvcgot=[$line]"
                for i in $(seq 300); do m=$(sed -n 's/MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo); [ "$m" -le 150000 ] && break; sleep 1; done
                echo "memtotal=$m"
                echo "INFLATED"; read -r go <&3
                dd if=/dev/urandom of=/tmp/k bs=4096 count=16 2>/dev/null
                echo "ksum=$(sha256sum /tmp/k | cut -d' ' -f1)"
                dd if=/tmp/k of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null && echo "SYNCED"
                sleep 3600
                """;
            using var vm = new KvmSharpProcess([
                "run", "--kernel", Assets.MinimalKernel, "--initrd", Assets.Initrd, "--memory", "256M", "--prefault",
                "--transport", "mmio", "--console", "virtio", "--rng", "--balloon", "100", "--disk", $"{overlay},id=ovl",
                "--cmdline", $"{Assets.FastCmdline} kvmsharp.run={BootTests.Encode(Script)} kvmsharp.exit=poweroff"]);
            long rssStart, rssInflated;
            try
            {
                Assert.True(vm.WaitForOutput("Linux version", Step), "kernel did not start");
                rssStart = RssKiB(vm.Pid);
                Assert.True(vm.WaitForOutput("HVC-READ", Step), "guest did not reach the hvc0 step");
                vm.WriteInput("typed on the host\n");
                Assert.True(vm.WaitForOutput("INFLATED", Step), "balloon did not inflate");
                rssInflated = RssKiB(vm.Pid);
                vm.WriteInput("go\n");
                Assert.True(vm.WaitForOutput("SYNCED", Step), "guest did not sync its block");
                HostShell.Run($"kill -KILL {vm.Pid}");
                Assert.True(vm.WaitForExit(TimeSpan.FromMinutes(1)), "VMM survived SIGKILL");
            }
            finally
            {
                output.WriteLine(vm.Stdout);
                output.WriteLine(vm.Stderr);
            }
            string o = vm.Stdout;
            Assert.Contains("mmio=4", o);
            foreach (var driver in new[] { "virtio_blk", "virtio_rng", "virtio_balloon", "virtio_console" })
                Assert.Matches($"drivers=.*{driver}", o);
            Assert.Contains("rng=virtio_rng.0", o);
            Assert.Contains("base=BASE-PATTERN", o);
            Assert.Contains("hello on hvc0", o);
            Assert.Contains("hvcgot=[typed on the host]", o);
            long memTotal = long.Parse(Regex.Match(o, "memtotal=([0-9]+)").Groups[1].Value, CultureInfo.InvariantCulture);
            Assert.InRange(memTotal, 248544 - 102400 - 8192, 150000);
            output.WriteLine($"VmRSS at kernel start: {rssStart} KiB, after inflating: {rssInflated} KiB");
            Assert.True(rssStart >= 256 * 1024, $"RSS {rssStart} KiB at kernel start: RAM was not prefaulted");
            Assert.True(rssInflated <= rssStart - 90 * 1024, $"RSS went from {rssStart} KiB to {rssInflated} KiB; the balloon should return about 100 MiB");

            // The synced block is in the overlay; the image is still one qemu-img reads (leaks allowed
            // after SIGKILL: exit code 3), and the base never changed.
            int check = HostShell.ExitCode($"qemu-img check {overlay}");
            Assert.True(check is 0 or 3, $"qemu-img check exit code {check}");
            HostShell.Run($"qemu-img convert -O raw {overlay} {flat}");
            byte[] data = File.ReadAllBytes(flat);
            string guestSum = Regex.Match(o, "ksum=([0-9a-f]{64})").Groups[1].Value;
            Assert.Equal(guestSum, Convert.ToHexString(SHA256.HashData(data.AsSpan(256 * 4096, 16 * 4096))).ToLowerInvariant());
            Assert.Equal("BASE-PATTERN"u8.ToArray(), data[..12]);
            Assert.Equal(basePattern, File.ReadAllBytes(baseImage));
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
    }

    private static long RssKiB(int pid)
    {
        string status = File.ReadAllText($"/proc/{pid}/status");
        return long.Parse(Regex.Match(status, @"VmRSS:\s+(\d+) kB").Groups[1].Value, CultureInfo.InvariantCulture);
    }
}
