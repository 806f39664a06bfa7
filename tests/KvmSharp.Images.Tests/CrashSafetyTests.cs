using System.Diagnostics;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Images.Tests;

/// <summary>kill -9 at random moments leaves an image with at most leaked clusters.</summary>
public class CrashSafetyTests
{
    [Theory]
    [InlineData(1, 512, true)]
    [InlineData(2, 512, false)]
    [InlineData(3, 4096, true)]
    [InlineData(4, 65536, true)]
    [InlineData(5, 512, true)]
    [InlineData(6, 4096, false)]
    public async Task KillNineLeavesOnlyLeaks(int seed, int clusterSize, bool withBacking)
    {
        Qemu.Require();
        using var d = new TempDir();
        ulong size = 48 << 20;
        if (withBacking) File.WriteAllBytes(d["base.raw"], Pattern.Make((int)size, seed));
        Qcow2Creator.Create(d["a.qcow2"], new Qcow2CreateOptions
        {
            Size = size, ClusterSize = clusterSize,
            BackingFile = withBacking ? "base.raw" : null, BackingFormat = withBacking ? "raw" : null,
        });
        string exe = Path.ChangeExtension(typeof(CrashSafetyTests).Assembly.Location, null);
        var psi = new ProcessStartInfo(exe) { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add("--crash-writer");
        psi.ArgumentList.Add(d["a.qcow2"]);
        psi.ArgumentList.Add(seed.ToString(System.Globalization.CultureInfo.InvariantCulture));
        using (var p = Process.Start(psi)!)
        {
            var readyTask = p.StandardOutput.ReadLineAsync(TestContext.Current.CancellationToken).AsTask();
            var first = await Task.WhenAny(readyTask, Task.Delay(TimeSpan.FromSeconds(60), TestContext.Current.CancellationToken));
            if (first != readyTask || await readyTask != "ready")
            {
                p.Kill();
                Assert.Fail("writer never became ready: " + p.StandardError.ReadToEnd());
            }
            await Task.Delay(100 + seed * 97 % 700, TestContext.Current.CancellationToken);
            if (p.HasExited) Assert.Fail("writer died by itself: " + p.StandardError.ReadToEnd());
            p.Kill(); // SIGKILL
            p.WaitForExit();
        }
        var (code, output) = Qemu.Check(d["a.qcow2"]);
        Assert.True(code is 0 or 3, $"qemu-img check after kill -9 returned {code}: {output}");
        // Our own check agrees, repairs the leaks, and the image stays writable.
        using (var q = BlockDeviceFactory.OpenQcow2(d["a.qcow2"], readOnly: false))
        {
            var r = Qcow2Check.Run(q, Qcow2Check.RepairMode.Leaks);
            Assert.Equal(0, r.Corruptions);
            Assert.Equal(0, r.Leaks);
        }
        Assert.Equal(0, Qemu.Check(d["a.qcow2"]).Code);
    }
}
