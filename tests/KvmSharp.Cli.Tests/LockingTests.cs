using System.Diagnostics;
using System.Security.Cryptography;
using KvmSharp.Cli.Img;
using KvmSharp.Images;

namespace KvmSharp.Cli.Tests;

/// <summary>
/// QEMU's image locking (OFD byte locks, block/file-posix.c) both ways: a qemu-io holding an image
/// makes our img commands and the VMM's disk opening refuse; our open images make qemu-img and
/// qemu-io refuse; two of our own openers see each other; -U opts out for reads; closing releases.
/// </summary>
public class LockingTests
{
    private static (int Code, string Out, string Err) Img(params string[] args) => ImgInProcess.Run(args);

    /// <summary>b.qcow2 (data) ← t.qcow2 (data), r.raw.</summary>
    private static TempDir MakeImages()
    {
        Qemu.Require();
        var d = new TempDir();
        Qemu.Img("create", "-q", "-f", "qcow2", d["b.qcow2"], "4M");
        Qemu.Io(d["b.qcow2"], "qcow2", "write -P 0x22 0 2M");
        Qemu.Img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", d["t.qcow2"]);
        Qemu.Io(d["t.qcow2"], "qcow2", "write -P 0x33 1M 1M");
        File.WriteAllBytes(d["r.raw"], Pattern.Make(2 << 20, 5));
        return d;
    }

    private static string Hash(string path) => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(path)));

    /// <summary>qemu-io with the image open (writable unless <paramref name="readOnly"/>) until disposed,
    /// or, with <paramref name="vm"/>, a stopped QEMU VM with it as a virtio disk (qemu-io shares
    /// everything on a raw image; a VM, like ours, does not let others write its disk).</summary>
    private sealed class QemuHolder : IDisposable
    {
        private readonly Process _p;

        public QemuHolder(string image, string fmt, bool readOnly, bool vm = false)
        {
            var psi = new ProcessStartInfo(vm ? "qemu-system-x86_64" : "qemu-io") { RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true };
            var args = vm
                ? new[] { "-S", "-display", "none", "-monitor", "none", "-serial", "none", "-nodefaults", "-drive", $"file={image},format={fmt},if=virtio,readonly={(readOnly ? "on" : "off")}" }
                : (readOnly ? new[] { "-r" } : []).Concat(new[] { "-f", fmt, "-c", "sleep 120000", image }).ToArray();
            foreach (var a in args) psi.ArgumentList.Add(a);
            _p = Process.Start(psi)!;
            // Wait until its locks show in /proc/locks (by inode).
            string ino = $":{Inode(image)} ";
            var sw = Stopwatch.StartNew();
            while (!File.ReadAllText("/proc/locks").Contains(ino, StringComparison.Ordinal))
            {
                if (_p.WaitForExit(20))
                    Assert.Fail($"qemu-io exited ({_p.ExitCode}): {_p.StandardError.ReadToEnd()}{_p.StandardOutput.ReadToEnd()}");
                Assert.True(sw.Elapsed < TimeSpan.FromSeconds(90), "qemu-io took no lock in 90 s");
            }
        }

        private static ulong Inode(string path) => ImageFile.Identify(path)!.Value.Inode;

        public void Dispose()
        {
            _p.Kill();
            _p.WaitForExit();
            _p.Dispose();
        }
    }

    private static void AssertLockError((int Code, string Out, string Err) r, string what)
    {
        Assert.True(r.Code != 0, $"img {what} succeeded while the image is in use");
        var lines = r.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.True(lines.Length == 1, r.Err);
        Assert.Matches("Failed to get (shared )?\"(write|resize)\" lock; is another process using the image\\?", lines[0]);
    }

    [Fact]
    public void QemuWriterMakesOurCommandsRefuse()
    {
        using var d = MakeImages();
        string t = d["t.qcow2"], b = d["b.qcow2"], r = d["r.raw"];
        string tHash = Hash(t), bHash = Hash(b), rHash = Hash(r);
        using (new QemuHolder(t, "qcow2", readOnly: false))
        using (new QemuHolder(r, "raw", readOnly: false, vm: true))
        {
            // Writers of the image or of its backing file (which the VM reads).
            foreach (var cmd in new[]
            {
                new[] { "commit", t }, new[] { "resize", t, "8M" }, new[] { "rebase", "-u", "-b", "", t },
                new[] { "check", "-r", "leaks", t }, new[] { "create", "-q", "-f", "qcow2", t, "1M" },
                new[] { "convert", "-O", "qcow2", d["b.qcow2"], t }, new[] { "bench", "-q", "-w", "-c", "1", b },
                new[] { "resize", "-f", "raw", r, "4M" }, new[] { "create", "-q", "-f", "raw", r, "1M" },
                new[] { "bench", "-q", "-w", "-c", "1", "-f", "raw", r },
            })
                AssertLockError(Img(cmd), string.Join(' ', cmd));
            // Readers without -U, as qemu-img: the VM may change the metadata underneath.
            foreach (var cmd in new[] { new[] { "info", t }, new[] { "check", t }, new[] { "map", t }, new[] { "compare", t, b }, new[] { "snapshot", "-l", t }, new[] { "map", "-f", "raw", r } })
                AssertLockError(Img(cmd), string.Join(' ', cmd));
            // -U / --force-share opts out for reads; the backing file alone is shared for reading.
            foreach (var cmd in new[] { new[] { "info", "-U", t }, new[] { "check", "-U", t }, new[] { "map", "-U", t }, new[] { "compare", "-U", t, t }, new[] { "info", "--force-share", t }, new[] { "info", b }, new[] { "map", b }, new[] { "info", r } })
                Assert.True(Img(cmd).Code == 0, string.Join(' ', cmd));

            // The VMM's disk opening (run --disk): writable and read-only disks both refuse.
            var e = Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(t, readOnly: false).Dispose());
            Assert.Equal(ImageErrorKind.InUse, e.Kind);
            Assert.Contains("Failed to get \"write\" lock", e.Message, StringComparison.Ordinal);
            Assert.Equal(ImageErrorKind.InUse, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(t, readOnly: true).Dispose()).Kind);
            Assert.Equal(ImageErrorKind.InUse, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(b, readOnly: false).Dispose()).Kind);
            Assert.Equal(ImageErrorKind.InUse, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(r, readOnly: false, "raw").Dispose()).Kind);
            using (BlockDeviceFactory.Open(b, readOnly: true)) { } // a second reader of the backing file
        }
        Assert.Equal(tHash, Hash(t));
        Assert.Equal(bHash, Hash(b));
        Assert.Equal(rHash, Hash(r));
        // qemu-io gone: its locks went with it.
        Assert.Equal(0, Img("resize", t, "8M").Code);
        Assert.Equal(0, Img("commit", "-q", t).Code);
    }

    [Fact]
    public void QemuReaderMakesOurWritersRefuse()
    {
        using var d = MakeImages();
        string b = d["b.qcow2"];
        using (new QemuHolder(b, "qcow2", readOnly: true))
        {
            AssertLockError(Img("resize", b, "8M"), "resize");
            AssertLockError(Img("commit", d["t.qcow2"]), "commit into a base in use");
            Assert.Equal(0, Img("info", b).Code);
            using (BlockDeviceFactory.Open(d["t.qcow2"], readOnly: false)) { } // b is only read through t
        }
    }

    [Fact]
    public void OurOpenImagesMakeQemuRefuse()
    {
        using var d = MakeImages();
        string t = d["t.qcow2"], b = d["b.qcow2"], r = d["r.raw"];
        using (BlockDeviceFactory.Open(t, readOnly: false))
        using (BlockDeviceFactory.Open(r, readOnly: false, "raw"))
        {
            foreach (var args in new[]
            {
                new[] { "info", t }, new[] { "check", t }, new[] { "commit", t }, new[] { "resize", t, "8M" },
                new[] { "create", "-f", "qcow2", t, "1M" }, new[] { "create", "-f", "qcow2", b, "1M" },
                new[] { "convert", "-O", "raw", r, b }, new[] { "resize", "-f", "raw", r, "4M" },
                new[] { "create", "-f", "raw", r, "1M" },
            })
            {
                var q = Qemu.Run("qemu-img", args);
                Assert.True(q.Code != 0, $"qemu-img {string.Join(' ', args)} succeeded while we use the image");
                Assert.Contains("lock", q.Err, StringComparison.Ordinal);
            }
            var w = Qemu.Run("qemu-io", "-f", "qcow2", "-c", "write 0 512", b);
            Assert.Contains("Failed to get \"write\" lock", w.Out + w.Err, StringComparison.Ordinal);
            Assert.Equal(0, Qemu.Run("qemu-img", "info", "-U", t).Code);
            Assert.Equal(0, Qemu.Run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", b).Code);
        }
        // Disposed: the locks are gone.
        Assert.Equal(0, Qemu.Run("qemu-img", "resize", "-q", t, "8M").Code);
        Assert.Equal(0, Qemu.Run("qemu-io", "-f", "qcow2", "-c", "write 0 512", b).Code);

        // A read-only disk lets qemu-img read, not write.
        using (BlockDeviceFactory.Open(t, readOnly: true))
        {
            Assert.Equal(0, Qemu.Run("qemu-img", "info", t).Code);
            Assert.NotEqual(0, Qemu.Run("qemu-io", "-f", "qcow2", "-c", "write 0 512", t).Code);
        }
    }

    [Fact]
    public void TwoOfOurOpenersSeeEachOther()
    {
        using var d = MakeImages();
        string t = d["t.qcow2"], b = d["b.qcow2"], r = d["r.raw"];
        using (BlockDeviceFactory.Open(t, readOnly: false))
        {
            // Two VMs on one disk, a VM and its disk's backing file written, a reader of a written disk.
            Assert.Equal(ImageErrorKind.InUse, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(t, readOnly: false).Dispose()).Kind);
            Assert.Equal(ImageErrorKind.InUse, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(b, readOnly: false).Dispose()).Kind);
            Assert.Equal(ImageErrorKind.InUse, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(t, readOnly: true).Dispose()).Kind);
            using (BlockDeviceFactory.Open(t, readOnly: true, null, openBacking: true, forceShare: true)) { }
            using (BlockDeviceFactory.Open(b, readOnly: true)) { }
            AssertLockError(Img("info", t), "info");
            Assert.Equal(0, Img("info", "-U", t).Code);
        }
        using (BlockDeviceFactory.Open(r, readOnly: true, "raw"))
        using (BlockDeviceFactory.Open(r, readOnly: true, "raw"))
        {
            Assert.Equal(ImageErrorKind.InUse, Assert.Throws<ImageException>(() => BlockDeviceFactory.Open(r, readOnly: false, "raw").Dispose()).Kind);
        }
        // A refused open leaves no lock behind, and disposing releases: now one writer is fine again.
        using (BlockDeviceFactory.Open(t, readOnly: false)) { }
        using (BlockDeviceFactory.Open(r, readOnly: false, "raw")) { }
    }
}
