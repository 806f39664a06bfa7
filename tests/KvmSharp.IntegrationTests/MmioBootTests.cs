using System.Globalization;
using System.Security.Cryptography;
using System.Text.RegularExpressions;
using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// One boot of the minimal kernel with no initramfs and every device on the virtio-mmio transport:
/// the root file system is a qcow2 overlay (made by qemu-img) over an ext4 base image made with
/// mkfs.ext4 -d from the test guest's files, a second raw disk, virtio-rng, virtio-console as the
/// console input, and the balloon over prefaulted RAM. The guest talks on hvc0 both ways, inflates
/// the balloon (the VMM's RSS must drop), writes a file on its root and a block on the raw disk,
/// syncs, and the test kills the VMM with SIGKILL: what was synced must be on the host, the overlay
/// must still be a valid image, and the base must not have changed.
/// </summary>
public class MmioBootTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Step = TimeSpan.FromMinutes(10);

    [Fact]
    public void RootOnQcow2OverMmioWithConsoleBalloonAndSyncedDataSurvivingSigkill()
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        Assets.RequireFile(Assets.MinimalKernel, "run guest/build.sh");
        Assets.RequireFile(Assets.Initrd, "run guest/build.sh");
        Assets.RequireFile("/usr/bin/qemu-img", "apt-get install qemu-utils (scripts/setup.sh does)");

        string work = Directory.CreateTempSubdirectory("kvmsharp-mmio").FullName;
        string rootDir = Path.Combine(work, "root"), baseImage = Path.Combine(work, "base.ext4"), overlay = Path.Combine(work, "overlay.qcow2");
        string dataDisk = Path.Combine(work, "data.raw"), flat = Path.Combine(work, "flat.raw");
        Directory.CreateDirectory(rootDir);
        // The root file system holds exactly what the test initramfs holds (busybox, /init, fstab).
        HostShell.Run($"cd {rootDir} && cpio -id --quiet < {Assets.Initrd} && mkfs.ext4 -q -F -d {rootDir} {baseImage} 64M");
        HostShell.Run($"qemu-img create -q -f qcow2 -b {baseImage} -F raw {overlay}");
        var dataPattern = new byte[8 << 20];
        "DATA-PATTERN"u8.CopyTo(dataPattern);
        File.WriteAllBytes(dataDisk, dataPattern);
        byte[] baseBefore = SHA256.HashData(File.ReadAllBytes(baseImage));
        try
        {
            // Balloon: RAM is prefaulted, so the VMM starts with all 256 MiB resident; the driver
            // inflates to 100 MiB at probe, which the VMM must give back to the host (MADV_DONTNEED).
            // Without DEFLATE_ON_OOM the inflated pages leave MemTotal (~248500 kB without a balloon).
            const string Script = """
                echo "mmio=$(ls /sys/bus/platform/drivers/virtio-mmio | grep -c virtio-mmio)"
                echo "drivers=$(ls /sys/bus/virtio/drivers | tr '\n' ' ')"
                echo "rootmount=$(grep ' / ' /proc/mounts | grep -v rootfs)"
                echo "rng=$(cat /sys/class/misc/hw_random/rng_current)"
                echo "data=$(dd if=/dev/vdb bs=12 count=1 2>/dev/null)"
                exec 3< /dev/hvc0
                echo "hello on hvc0" > /dev/hvc0
                echo "HVC-READ"; read -r line <&3; echo "hvcgot=[$line]"
                for i in $(seq 300); do m=$(sed -n 's/MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo); [ "$m" -le 150000 ] && break; sleep 1; done
                echo "memtotal=$m"
                echo "INFLATED"; read -r go <&3
                echo "synced on the root disk" > /written-on-root
                dd if=/dev/urandom of=/tmp/k bs=4096 count=16 2>/dev/null
                echo "ksum=$(sha256sum /tmp/k | cut -d' ' -f1)"
                dd if=/tmp/k of=/dev/vdb bs=4096 seek=256 conv=fsync 2>/dev/null && sync && echo "SYNCED"
                sleep 3600
                """;
            using var vm = new KvmSharpProcess([
                "run", "--kernel", Assets.MinimalKernel, "--memory", "256M", "--prefault",
                "--transport", "mmio", "--console", "virtio", "--rng", "--balloon", "100",
                "--disk", $"{overlay},id=root", "--disk", $"{dataDisk},id=data",
                "--cmdline", $"{Assets.FastCmdline} root=/dev/vda rw rootwait init=/init kvmsharp.run={BootTests.Encode(Script)} kvmsharp.exit=poweroff"]);
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
                Assert.True(vm.WaitForOutput("SYNCED", Step), "guest did not sync");
                HostShell.Run($"kill -KILL {vm.Pid}");
                Assert.True(vm.WaitForExit(TimeSpan.FromMinutes(1)), "VMM survived SIGKILL");
            }
            finally
            {
                output.WriteLine(vm.Stdout);
                output.WriteLine(vm.Stderr);
            }
            string o = vm.Stdout;
            Assert.Contains("mmio=5", o);
            foreach (var driver in new[] { "virtio_blk", "virtio_rng", "virtio_balloon", "virtio_console" })
                Assert.Matches($"drivers=.*{driver}", o);
            Assert.Matches("rootmount=/dev/root / ext4 rw", o);
            Assert.Contains("KVMSHARP-READY", o);
            Assert.Contains("rng=virtio_rng.0", o);
            Assert.Contains("data=DATA-PATTERN", o);
            Assert.Contains("hello on hvc0", o);
            Assert.Contains("hvcgot=[typed on the host]", o);
            long memTotal = long.Parse(Regex.Match(o, "memtotal=([0-9]+)").Groups[1].Value, CultureInfo.InvariantCulture);
            Assert.InRange(memTotal, 248544 - 102400 - 8192, 150000);
            output.WriteLine($"VmRSS at kernel start: {rssStart} KiB, after inflating: {rssInflated} KiB");
            Assert.True(rssStart >= 256 * 1024, $"RSS {rssStart} KiB at kernel start: RAM was not prefaulted");
            Assert.True(rssInflated <= rssStart - 90 * 1024, $"RSS went from {rssStart} KiB to {rssInflated} KiB; the balloon should return about 100 MiB");

            // After SIGKILL: the overlay is still an image qemu-img reads (leaks allowed: exit code 3);
            // e2fsck recovers the journal of the root file system (exit 0 or 1 = "corrected") and the
            // synced file is there; the synced block is on the raw disk; the base never changed.
            int check = HostShell.ExitCode($"qemu-img check {overlay}");
            Assert.True(check is 0 or 3, $"qemu-img check exit code {check}");
            HostShell.Run($"qemu-img convert -O raw {overlay} {flat}");
            int fsck = HostShell.ExitCode($"e2fsck -fy {flat}");
            Assert.True(fsck is 0 or 1, $"e2fsck exit code {fsck}");
            Assert.Contains("synced on the root disk", HostShell.Output($"debugfs -R 'cat /written-on-root' {flat} 2>/dev/null"));
            byte[] data = File.ReadAllBytes(dataDisk);
            string guestSum = Regex.Match(o, "ksum=([0-9a-f]{64})").Groups[1].Value;
            Assert.Equal(guestSum, Convert.ToHexString(SHA256.HashData(data.AsSpan(256 * 4096, 16 * 4096))).ToLowerInvariant());
            Assert.Equal("DATA-PATTERN"u8.ToArray(), data[..12]);
            Assert.Equal(baseBefore, SHA256.HashData(File.ReadAllBytes(baseImage)));
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
