using System.Diagnostics;
using System.Text.RegularExpressions;
using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// One boot of guest (a) with PCI devices: a read-write and a read-only virtio-blk disk (ext4 made on
/// the host with mkfs.ext4 -d, checked afterwards with debugfs and e2fsck), virtio-rng gives entropy,
/// the balloon takes 64 MiB out of MemTotal, virtio-net moves a file over
/// TCP to the host end of a TAP in a network namespace made by the test (the host's own network is
/// never touched), and `poweroff` ends the VM through ACPI with exit code 0.
/// </summary>
public class DeviceBootTests(ITestOutputHelper output)
{
    private static readonly TimeSpan BootTimeout = TimeSpan.FromMinutes(15);

    [Fact]
    public void DisksRngAndNetworkWorkAndPoweroffExitsZero()
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        Assets.RequireFile(Assets.MinimalKernel, "run guest/build.sh");
        Assets.RequireFile(Assets.Initrd, "run guest/build.sh");
        Assets.RequireFile("/dev/net/tun", "no TUN/TAP support on this host");
        Assets.RequireFile("/usr/bin/busybox", "apt-get install busybox-static (scripts/setup.sh does)");

        string ns = $"kvmsharp-it{Environment.ProcessId}";
        const string Tap = "kstap0", HostIp = "172.31.213.1", GuestIp = "172.31.213.2";
        string received = Path.Combine(Path.GetTempPath(), $"{ns}.bin");
        string work = Directory.CreateTempSubdirectory("kvmsharp-disk").FullName;
        string rwImage = Path.Combine(work, "rw.ext4"), roImage = Path.Combine(work, "ro.ext4"), content = Path.Combine(work, "content");
        Directory.CreateDirectory(content);
        File.WriteAllText(Path.Combine(content, "hello.txt"), "written on the host\n");
        HostShell.Run($"mkfs.ext4 -q -F -d {content} {rwImage} 32M && cp {rwImage} {roImage}");
        byte[] roBefore = File.ReadAllBytes(roImage);
        var netns = new HostShell.NetNamespace(ns, Tap, HostIp);
        Process? listener = null;
        try
        {
            listener = Process.Start(new ProcessStartInfo("sh", ["-c", $"exec ip netns exec {ns} timeout 900 busybox nc -l -p 5000 > {received}"]))!;

            string script = $"""
                echo "rng=$(cat /sys/class/misc/hw_random/rng_current)"
                dd if=/dev/hwrng of=/tmp/r bs=64 count=1 2>/dev/null; echo "rngbytes=$(wc -c < /tmp/r)"
                # 64 MiB balloon over virtio-pci: MemTotal is ~248500 kB without it, ~183000 kB with it.
                for i in $(seq 300); do m=$(sed -n 's/MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo); [ "$m" -le 200000 ] && break; sleep 1; done; echo "memtotal=$m"
                ip link set eth0 up && ip addr add {GuestIp}/24 dev eth0
                ping -c 2 -W 5 {HostIp} >/dev/null && echo ping=ok
                dd if=/dev/urandom of=/tmp/f bs=1024 count=256 2>/dev/null
                echo "sum=$(sha256sum /tmp/f | cut -d' ' -f1)"
                nc {HostIp} 5000 < /tmp/f && echo sent=ok
                echo "serials=$(cat /sys/block/vda/serial)/$(cat /sys/block/vdb/serial) ro=$(cat /sys/block/vdb/ro)"
                mkdir -p /mnt/rw /mnt/ro && mount -t ext4 /dev/vda /mnt/rw && echo "read=$(cat /mnt/rw/hello.txt)"
                echo "from the guest" > /mnt/rw/guest.txt && sync && umount /mnt/rw && echo rw=ok
                mount -t ext4 -o ro /dev/vdb /mnt/ro && echo "roread=$(cat /mnt/ro/hello.txt)"
                touch /mnt/ro/x 2>/dev/null || echo rowrite=refused
                dd if=/dev/zero of=/dev/vdb bs=4096 count=1 2>/dev/null || echo rawwrite=refused
                umount /mnt/ro
                """;
            using var vm = new KvmSharpProcess([
                "ip", "netns", "exec", ns, Assets.Binary,
                "run", "--kernel", Assets.MinimalKernel, "--initrd", Assets.Initrd, "--memory", "256M", "--rng", "--balloon", "64", "--net", $"tap={Tap},mac=52:54:00:aa:bb:01",
                "--disk", $"{rwImage},id=rootdisk", "--disk", $"{roImage},ro,id=seed",
                "--cmdline", $"{Assets.FastCmdline} kvmsharp.run={BootTests.Encode(script)} kvmsharp.exit=poweroff"], fileName: "/usr/bin/env");
            try
            {
                Assert.True(vm.WaitForExit(BootTimeout), "guest did not power off");
            }
            finally
            {
                output.WriteLine(vm.Stdout);
                output.WriteLine(vm.Stderr);
            }
            string o = vm.Stdout;
            Assert.Contains("rng=virtio_rng.0", o);
            Assert.Contains("rngbytes=64", o);
            Assert.InRange(long.Parse(Regex.Match(o, "memtotal=([0-9]+)").Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture), 248544 - 65536 - 8192, 200000);
            Assert.Contains("ping=ok", o);
            Assert.Contains("sent=ok", o);
            Assert.True(listener.WaitForExit(60_000), "host listener did not finish");
            string guestSum = Regex.Match(o, "sum=([0-9a-f]{64})").Groups[1].Value;
            string hostSum = Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(received))).ToLowerInvariant();
            Assert.Equal(256 * 1024, new FileInfo(received).Length);
            Assert.Equal(guestSum, hostSum);
            Assert.Contains("serials=rootdisk/seed ro=1", o);
            Assert.Contains("read=written on the host", o);
            Assert.Contains("rw=ok", o);
            Assert.Contains("roread=written on the host", o);
            Assert.Contains("rowrite=refused", o);
            Assert.Contains("rawwrite=refused", o);
            // The host sees the guest's file, and the file system is clean.
            Assert.Contains("from the guest", HostShell.Output($"debugfs -R 'cat /guest.txt' {rwImage} 2>/dev/null"));
            HostShell.Run($"e2fsck -n -f {rwImage}");
            Assert.Equal(roBefore, File.ReadAllBytes(roImage));
            Assert.Contains("KVMSHARP-END rc=0", o);
            Assert.Equal(0, vm.ExitCode);
        }
        finally
        {
            if (listener is { HasExited: false })
                listener.Kill(entireProcessTree: true);
            netns.Dispose();
            File.Delete(received);
            Directory.Delete(work, recursive: true);
        }
    }

    /// <summary>
    /// Guest (b), Debian's own kernel with its own modules (virtio_pci, virtio_blk, virtio_net,
    /// virtio_rng, virtio_balloon, ext4 from its initramfs): finds the disk, the NIC, the rng and the
    /// balloon over virtio-pci, mounts the host-made ext4, writes to it, pings the host end of its TAP
    /// and powers off with exit code 0. (15–35 minutes on a PVM host; about a minute in the nested KVM host.)
    /// </summary>
    [Fact]
    public void DistroKernelFindsDiskNetworkRngAndBalloon()
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        Assets.RequireFile(Assets.DistroKernel, "run guest/build.sh");
        Assets.RequireFile(Assets.DistroInitrd, "run guest/build.sh");
        Assets.RequireFile("/dev/net/tun", "no TUN/TAP support on this host");

        const string Tap = "kstap1", HostIp = "172.31.216.1", GuestIp = "172.31.216.2";
        string work = Directory.CreateTempSubdirectory("kvmsharp-distro").FullName;
        string image = Path.Combine(work, "rw.ext4"), content = Path.Combine(work, "content");
        Directory.CreateDirectory(content);
        File.WriteAllText(Path.Combine(content, "hello.txt"), "written on the host\n");
        HostShell.Run($"mkfs.ext4 -q -F -d {content} {image} 32M");
        try
        {
            using var ns = new HostShell.NetNamespace($"kvmsharp-distro{Environment.ProcessId}", Tap, HostIp);
            string script = $"""
                echo "kernel=$(uname -r)"
                echo "drivers=$(ls /sys/bus/virtio/drivers | tr '\n' ' ')"
                echo "rng=$(cat /sys/class/misc/hw_random/rng_current)"
                dd if=/dev/hwrng of=/tmp/r bs=64 count=1 2>/dev/null; echo "rngbytes=$(wc -c < /tmp/r)"
                # The balloon inflates in the background. Without it MemTotal is 983876 kB here (1 GiB
                # less what the kernel keeps); wait until at least 32 MiB of the balloon shows.
                for i in $(seq 300); do m=$(sed -n 's/MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo); [ "$m" -le 950272 ] && break; sleep 1; done
                echo "memtotal=$m"
                ip link set eth0 up && ip addr add {GuestIp}/24 dev eth0
                ping -c 2 -W 5 {HostIp} >/dev/null && echo ping=ok
                mkdir -p /mnt/rw && mount -t ext4 /dev/vda /mnt/rw && echo "read=$(cat /mnt/rw/hello.txt)"
                echo "from the distro guest" > /mnt/rw/guest.txt && sync && umount /mnt/rw && echo rw=ok
                """;
            using var vm = new KvmSharpProcess([
                "ip", "netns", "exec", ns.Name, Assets.Binary,
                "run", "--kernel", Assets.DistroKernel, "--initrd", Assets.DistroInitrd, "--memory", "1G",
                "--rng", "--balloon", "64", "--net", $"tap={Tap}", "--disk", $"{image},id=root",
                "--cmdline", $"{Assets.FastCmdline} kvmsharp.run={BootTests.Encode(script)} kvmsharp.exit=poweroff"], fileName: "/usr/bin/env");
            try
            {
                Assert.True(vm.WaitForExit(TimeSpan.FromMinutes(45)), "distro guest did not power off");
            }
            finally
            {
                output.WriteLine(vm.Stdout);
                output.WriteLine(vm.Stderr);
            }
            string o = vm.Stdout;
            Assert.Contains("KVMSHARP-READY", o);
            Assert.Matches("kernel=6\\.1\\..*-amd64", o);
            foreach (var driver in new[] { "virtio_blk", "virtio_net", "virtio_rng", "virtio_balloon" })
                Assert.Matches($"drivers=.*{driver}", o);
            Assert.Contains("rng=virtio_rng.0", o);
            Assert.Contains("rngbytes=64", o);
            // The balloon took its share: without DEFLATE_ON_OOM Linux removes inflated pages from
            // MemTotal (983876 kB without a balloon; 918340 kB with all 64 MiB inflated).
            long memTotalKiB = long.Parse(Regex.Match(o, "memtotal=([0-9]+)").Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
            Assert.InRange(memTotalKiB, 983876 - 65536 - 8192, 950272);
            Assert.Contains("ping=ok", o);
            Assert.Contains("read=written on the host", o);
            Assert.Contains("rw=ok", o);
            Assert.Contains("from the distro guest", HostShell.Output($"debugfs -R 'cat /guest.txt' {image} 2>/dev/null"));
            HostShell.Run($"e2fsck -n -f {image}");
            Assert.Contains("KVMSHARP-END rc=0", o);
            Assert.Equal(0, vm.ExitCode);
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
    }
}
