using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// Careless and hostile inputs to <c>kvmsharp run</c>, through the real binary: numbers that wrap,
/// kernels and initrds that are huge, endless or not files, config files from pipes, bad disk images.
/// Each is one line and a clear exit code, found before KVM is opened (so these run anywhere), with the
/// VMM's memory bounded by what the guest could hold rather than by what the input claims or holds.
/// </summary>
public sealed class RunInputTests : IDisposable
{
    private static readonly TimeSpan Quick = TimeSpan.FromSeconds(60);

    /// <summary>The managed heap the binary may use for these runs: far below any of the inputs, far
    /// above what a refusal needs. Reading a 1.5 GiB file whole, or /dev/zero, runs out of it.</summary>
    private const string HeapLimit = "DOTNET_GCHeapHardLimit=8000000"; // hexadecimal: 128 MiB

    private readonly string _dir = Directory.CreateTempSubdirectory("kvmsharp-runinput-").FullName;
    private readonly string _kernel;

    public RunInputTests()
    {
        _kernel = TinyElf.Write(TinyElf.DebugExitCode(0x21));
        File.Move(_kernel, Path.Combine(_dir, "guest.elf"));
        _kernel = Path.Combine(_dir, "guest.elf");
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>A sparse file of <paramref name="bytes"/>: costs no disk, reads as zeros.</summary>
    private string Sparse(string name, long bytes, byte[]? start = null)
    {
        string path = Path.Combine(_dir, name);
        using var f = File.Create(path);
        f.Write(start ?? []);
        f.SetLength(bytes);
        return path;
    }

    // Class: numbers that overflow or contradict each other are usage errors (exit 2), before any file is read.
    public static TheoryData<string[], string> BadNumbers => new()
    {
        { ["--balloon", "17592186044416"], "--balloon: 17592186044416 MiB would take all of the guest's 256 MiB" }, // 2^44 MiB: * 2^20 wrapped to 0
        { ["--balloon", "18446744073709551615"], "--balloon" },
        { ["--balloon", "18446744073709551616"], "--balloon takes MiB as a number" },
        { ["--memory", "64M", "--balloon", "64"], "--balloon: 64 MiB would take all of the guest's 64 MiB" },
        { ["--balloon", "100", "--memory", "100M"], "--balloon: 100 MiB" }, // order does not matter
        { ["--memory", "4095K"], "--memory: must be a multiple of 4 KiB" },
        { ["--memory", "15M"], "--memory: must be a multiple of 4 KiB between 16 MiB and 1 TiB" },
        { ["--memory", "2T"], "--memory: must be a multiple of 4 KiB between 16 MiB and 1 TiB" },
        { ["--memory", "16777216T"], "--memory: '16777216T' is too large" },
        { ["--memory", "0"], "--memory: '0' is not a size" },
        { ["--cpus", "4294967297"], "--cpus must be a number from 1 to 64" },
    };

    [Theory]
    [MemberData(nameof(BadNumbers))]
    public void NumbersThatWrapOrContradictAreUsageErrors(string[] options, string expected)
    {
        Assets.RequireBinary();
        AssertOneLineError(2, expected, ["run", "--kernel", _kernel, .. options]);
    }

    [Theory]
    [InlineData("\"balloon\": { \"amount_mib\": 17592186044416 }", "balloon.amount_mib: 17592186044416 MiB would take all of the guest's 256 MiB")]
    [InlineData("\"balloon\": { \"amount_mib\": 1e20 }", "balloon.amount_mib: 1e20 is out of range")]
    [InlineData("\"machine-config\": { \"vcpu_count\": 4294967297, \"mem_size_mib\": 64 }", "machine-config.vcpu_count: 4294967297 is out of range")]
    [InlineData("\"machine-config\": { \"vcpu_count\": 1, \"mem_size_mib\": 2147483648 }", "machine-config.mem_size_mib: 2147483648 is out of range")]
    [InlineData("\"machine-config\": { \"vcpu_count\": 1, \"mem_size_mib\": 64 }, \"balloon\": { \"amount_mib\": 64 }", "balloon.amount_mib: 64 MiB would take all of the guest's 64 MiB")]
    public void ConfigFileNumbersThatWrapOrContradictAreUsageErrors(string section, string expected)
    {
        Assets.RequireBinary();
        string config = WriteConfig($$"""{ "boot-source": { "kernel_image_path": "guest.elf" }, {{section}} }""");
        AssertOneLineError(2, expected, "run", "--config", config);
    }

    // Class: a kernel or initrd that is not a regular file, or larger than the guest's RAM, is refused
    // before it is read: one line, exit 1, in bounded memory and time.
    [Theory]
    [InlineData("--kernel")]
    [InlineData("--initrd")]
    public void EndlessDeviceAsKernelOrInitrdIsRefusedWithoutReadingIt(string option)
    {
        Assets.RequireBinary();
        string[] args = option == "--kernel" ? ["run", "--kernel", "/dev/zero"] : ["run", "--kernel", _kernel, "--initrd", "/dev/zero"];
        AssertOneLineError(1, "/dev/zero is empty or not a regular file", [HeapLimit, Assets.Binary, .. args], env: true);
    }

    [Fact]
    public void EndlessDeviceInAConfigFileIsRefusedWithoutReadingIt()
    {
        Assets.RequireBinary();
        string config = WriteConfig("""{ "boot-source": { "kernel_image_path": "guest.elf", "initrd_path": "/dev/zero" } }""");
        AssertOneLineError(1, "The initrd file /dev/zero is empty or not a regular file", [HeapLimit, Assets.Binary, "run", "--config", config], env: true);
        config = WriteConfig("""{ "boot-source": { "kernel_image_path": "/dev/zero" } }""");
        AssertOneLineError(1, "The kernel file /dev/zero is empty or not a regular file", [HeapLimit, Assets.Binary, "run", "--config", config], env: true);
    }

    [Fact]
    public void KernelOrInitrdLargerThanGuestRamIsRefusedBeforeItIsRead()
    {
        Assets.RequireBinary();
        string huge = Sparse("huge.img", 3L << 29); // 1.5 GiB
        // --memory 64M: 63 MiB of low RAM above 1 MiB is all a kernel or initrd could occupy.
        AssertOneLineError(1, $"Memory is too small for the kernel file {huge}: it is 1610612736 bytes, more than the 63 MiB of guest RAM",
            [HeapLimit, Assets.Binary, "run", "--kernel", huge, "--memory", "64M"], env: true);
        AssertOneLineError(1, $"Memory is too small for the initrd file {huge}: it is 1610612736 bytes, more than the 63 MiB of guest RAM",
            [HeapLimit, Assets.Binary, "run", "--kernel", _kernel, "--initrd", huge, "--memory", "64M"], env: true);
    }

    [Fact]
    public void ElfKernelIsReadOnlyUpToItsLastSegment()
    {
        Assets.RequireBinary();
        // A vmlinux with 1.5 GiB of symbols after its segments: only the loaded bytes count and are
        // read, so it gets as far as KVM (absent here: exit 1 naming /dev/kvm; present: it boots).
        string withSymbols = Sparse("vmlinux-debug", 3L << 29, File.ReadAllBytes(_kernel));
        var (code, _, stderr) = Run([HeapLimit, Assets.Binary, "run", "--kernel", withSymbols, "--memory", "64M", "--debug-exit"], env: true);
        Assert.True(code is 1 or (0x21 << 1 | 1), $"exit code {code}: {stderr}");
        Assert.DoesNotContain("   at ", stderr);
        Assert.DoesNotContain(withSymbols, stderr);
    }

    // Class: a config file from a pipe is read to its end, with the same 1 MiB bound as a file.
    [Fact]
    public void ConfigFileFromAPipeIsRead()
    {
        Assets.RequireBinary();
        string config = WriteConfig("""{ "boot-source": { "kernel_image_path": "guest.elf" }, "machine-config": { "vcpu_count": 0, "mem_size_mib": 64 } }""");
        // Bash's process substitution hands the binary /dev/fd/63, a pipe that cannot seek.
        var (code, stdout, stderr) = Shell($"'{Assets.Binary}' run --config <(cat '{config}')");
        AssertOneLine(2, "/dev/fd/63: machine-config.vcpu_count: must be from 1 to 64, not 0", code, stdout, stderr);

        // From a pipe, relative paths are relative to the current directory (the pipe has none of its own).
        string relative = WriteConfig("""{ "boot-source": { "kernel_image_path": "no-such-kernel" } }""");
        (code, stdout, stderr) = Shell($"cd '{_dir}' && '{Assets.Binary}' run --config <(cat '{relative}')");
        AssertOneLine(1, $"boot-source.kernel_image_path: {Path.Combine(_dir, "no-such-kernel")} does not exist", code, stdout, stderr);

        // An endless input costs 1 MiB, then one line.
        AssertOneLineError(2, "/dev/zero: is larger than 1048576 bytes", [HeapLimit, Assets.Binary, "run", "--config", "/dev/zero"], env: true);
        (code, stdout, stderr) = Shell($"yes 2>/dev/null | '{Assets.Binary}' run --config /dev/stdin");
        AssertOneLine(2, "/dev/stdin: is larger than 1048576 bytes", code, stdout, stderr);
    }

    // Class: a disk image that cannot be used is one line naming it, exit 1, no stack trace. The images
    // are opened before KVM; where KVM is present the same holds (the lead runs this tier there).
    [Fact]
    public void BadDiskImageIsOneLineAndExit1()
    {
        Assets.RequireBinary();
        string corrupt = Path.Combine(_dir, "corrupt.qcow2");
        HostShell.Run($"qemu-img create -q -f qcow2 '{corrupt}' 1M");
        using (var f = File.OpenWrite(corrupt))
        {
            f.Position = 20; // cluster_bits (qcow2.txt: header bytes 20-23)
            f.Write([0, 0, 0, 99]);
        }
        string orphan = Path.Combine(_dir, "orphan.qcow2");
        HostShell.Run($"qemu-img create -q -f qcow2 -u -b '{_dir}/gone.qcow2' -F qcow2 '{orphan}' 1M");
        string[] boot = ["run", "--kernel", _kernel, "--memory", "64M", "--debug-exit"];

        AssertOneLineError(1, $"Disk image {corrupt}", [.. boot, "--disk", corrupt]);
        AssertOneLineError(1, "gone.qcow2", [.. boot, "--disk", $"{orphan},format=qcow2"]);
        AssertOneLineError(1, $"Disk image {orphan}", [.. boot, "--disk", $"{orphan},format=qcow2"]);
    }

    /// <summary>Guest RAM from hugetlbfs on a host without free huge pages: one line and exit 1 (it
    /// was a SIGBUS, exit 135, at the first write to guest memory: mmap with MAP_NORESERVE succeeds).</summary>
    [Fact]
    public void HugePagesWithoutFreeHugePagesIsOneLineAndExit1()
    {
        Assets.RequireBinary();
        if (!File.ReadLines("/proc/meminfo").Contains("HugePages_Free:        0"))
            Assert.Skip("this host has free huge pages, so --hugepages would work");
        AssertOneLineError(1, "--hugepages needs 32 free huge pages of 2048 kB for 64 MiB of guest RAM; the host has 0", "run", "--kernel", _kernel, "--memory", "64M", "--debug-exit", "--hugepages");
    }

    /// <summary>A failure after KVM is opened (here: a TAP name the kernel refuses) is one line and
    /// exit 1 too, with the KVM objects disposed.</summary>
    [Fact]
    public void FailureAfterKvmIsOpenedIsOneLineAndExit1()
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        AssertOneLineError(1, "kvmsharp: ", "run", "--kernel", _kernel, "--memory", "64M", "--debug-exit", "--net", "tap=no/slash");
    }

    private string WriteConfig(string json)
    {
        string path = Path.Combine(_dir, $"vm-{Guid.NewGuid():N}.json");
        File.WriteAllText(path, json);
        return path;
    }

    /// <summary>Runs the binary, or with <paramref name="env"/> <c>/usr/bin/env VAR=… binary …</c>.</summary>
    private static (int Code, string Stdout, string Stderr) Run(string[] args, bool env = false)
    {
        if (!env)
            return KvmSharpProcess.RunToEnd(Quick, args);
        using var p = new KvmSharpProcess(args, "/usr/bin/env");
        if (!p.WaitForExit(Quick))
            throw new TimeoutException($"kvmsharp {string.Join(' ', args)} did not exit within {Quick}.");
        return (p.ExitCode, p.Stdout, p.Stderr);
    }

    private static (int Code, string Stdout, string Stderr) Shell(string command) =>
        Run(["bash", "-c", command], env: true);

    private static void AssertOneLineError(int expectedCode, string expectedText, string[] args, bool env = false)
    {
        var (code, stdout, stderr) = Run(args, env);
        AssertOneLine(expectedCode, expectedText, code, stdout, stderr);
    }

    private static void AssertOneLineError(int expectedCode, string expectedText, params string[] args) =>
        AssertOneLineError(expectedCode, expectedText, args, env: false);

    private static void AssertOneLine(int expectedCode, string expectedText, int code, string stdout, string stderr)
    {
        Assert.True(expectedCode == code, $"exit code {code}, expected {expectedCode}: {stderr}");
        Assert.Contains(expectedText, stderr, StringComparison.Ordinal);
        Assert.Single(stderr.Trim().Split('\n'));
        Assert.DoesNotContain("   at ", stderr); // no stack trace
        Assert.Equal("", stdout);
    }
}
