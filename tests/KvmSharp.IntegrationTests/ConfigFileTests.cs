using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// <c>kvmsharp run --config FILE</c> (Firecracker-shaped JSON) and <c>--transport</c>, through the
/// real binary: bad files give one line naming the JSON path and exit 2; a good file drives a tiny
/// guest. Seconds in all: errors are found before KVM is touched, and the guest is a few bytes.
/// </summary>
public sealed class ConfigFileTests : IDisposable
{
    private static readonly TimeSpan Quick = TimeSpan.FromSeconds(60);

    /// <summary>mov eax,0xB; mov ecx,1; cpuid; mov eax,ebx; then debug-exit with al: the guest
    /// reports the logical-processor count of CPUID leaf 0xB's core level (the VMM sets it to the
    /// vCPU count). The same bytes in 32- and 64-bit mode.</summary>
    private static readonly byte[] ReportCpuCount =
        [0xB8, 0x0B, 0x00, 0x00, 0x00, 0xB9, 0x01, 0x00, 0x00, 0x00, 0x0F, 0xA2, 0x89, 0xD8, 0x66, 0xBA, 0xF4, 0x00, 0xEE, 0xEB, 0xFE];

    private readonly string _dir = Directory.CreateTempSubdirectory("kvmsharp-config-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>Writes <paramref name="json"/> as vm.json in the test's directory, next to a
    /// placeholder "kernel" file (these cases fail before the kernel is read).</summary>
    private string WriteConfig(string json)
    {
        File.WriteAllText(Path.Combine(_dir, "kernel"), "not read");
        string path = Path.Combine(_dir, "vm.json");
        File.WriteAllText(path, json);
        return path;
    }

    private const string Boot = """ "boot-source": { "kernel_image_path": "kernel" } """;

    public static TheoryData<string, string> BadFiles => new()
    {
        { "", "vm.json: the file is empty" },
        { "{ " + Boot + ", }", "vm.json: line 1, column" },
        { "[1, 2]", "vm.json: expected an object, got an array" },
        { "{}", "vm.json: boot-source: missing" },
        { """{ "boot-source": {} }""", "vm.json: boot-source.kernel_image_path: missing" },
        { """{ "boot-source": { "kernel_image_path": null } }""", "vm.json: boot-source.kernel_image_path: must not be null" },
        { """{ "boot-source": { "kernel_image_path": 7 } }""", "vm.json: boot-source.kernel_image_path: expected a string, got 7" },
        { """{ "boot-source": { "kernel_image_path": "kernel", "kernel_image_path": "kernel" } }""", "vm.json: boot-source.kernel_image_path: duplicate key" },
        { "{ " + Boot + """, "vsock": null }""", "vm.json: vsock: unknown key" },
        { "{ " + Boot + """, "machine-config": { "vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2" } }""", "vm.json: machine-config.cpu_template: unknown key" },
        { "{ " + Boot + """, "machine-config": { "mem_size_mib": 64 } }""", "vm.json: machine-config.vcpu_count: missing" },
        { "{ " + Boot + """, "machine-config": { "vcpu_count": "2", "mem_size_mib": 64 } }""", "vm.json: machine-config.vcpu_count: expected a whole number, got a string" },
        { "{ " + Boot + """, "machine-config": { "vcpu_count": 1.5, "mem_size_mib": 64 } }""", "vm.json: machine-config.vcpu_count: expected a whole number, got 1.5" },
        { "{ " + Boot + """, "machine-config": { "vcpu_count": 0, "mem_size_mib": 64 } }""", "vm.json: machine-config.vcpu_count: must be from 1 to 64, not 0" },
        { "{ " + Boot + """, "machine-config": { "vcpu_count": 65, "mem_size_mib": 64 } }""", "vm.json: machine-config.vcpu_count: must be from 1 to 64, not 65" },
        { "{ " + Boot + """, "machine-config": { "vcpu_count": 1, "mem_size_mib": -64 } }""", "vm.json: machine-config.mem_size_mib: must be from 16" },
        { "{ " + Boot + """, "machine-config": { "vcpu_count": 1, "mem_size_mib": 64, "smt": true } }""", "vm.json: machine-config.smt: true is not supported" },
        { "{ " + Boot + """, "machine-config": { "vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "1G" } }""", "vm.json: machine-config.huge_pages: takes \"None\" or \"2M\"" },
        { "{ " + Boot + """, "drives": [ { "drive_id": "a", "path_on_host": "kernel" }, { "drive_id": "b" } ] }""", "vm.json: drives[1].path_on_host: missing" },
        { "{ " + Boot + """, "drives": [ { "drive_id": "root", "path_on_host": "kernel" }, { "drive_id": "root", "path_on_host": "kernel" } ] }""", "vm.json: drives[1].drive_id: \"root\" is already the id of drives[0]" },
        { "{ " + Boot + """, "drives": [ { "drive_id": "a-name-longer-than-20", "path_on_host": "kernel" } ] }""", "vm.json: drives[0].drive_id: must be 1 to 20" },
        { "{ " + Boot + """, "drives": [ { "drive_id": "a", "path_on_host": "kernel", "is_read_only": "yes" } ] }""", "vm.json: drives[0].is_read_only: expected true or false, got a string" },
        { "{ " + Boot + """, "drives": [ { "drive_id": "a", "path_on_host": "kernel", "format": "vmdk" } ] }""", "vm.json: drives[0].format: takes \"raw\" or \"qcow2\"" },
        { "{ " + Boot + """, "drives": [ null ] }""", "vm.json: drives[0]: expected an object, got null" },
        { "{ " + Boot + """, "drives": { } }""", "vm.json: drives: expected an array, got an object" },
        { "{ " + Boot + """, "network-interfaces": [ { "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "52:54:00:12:34" } ] }""", "vm.json: network-interfaces[0].guest_mac: '52:54:00:12:34' is not a MAC address" },
        { "{ " + Boot + """, "network-interfaces": [ { "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:5e:00:00:01" } ] }""", "vm.json: network-interfaces[0].guest_mac: 01:00:5e:00:00:01 is a multicast address" },
        { "{ " + Boot + """, "network-interfaces": [ { "iface_id": "eth0", "host_dev_name": "tap0" }, { "iface_id": "eth0", "host_dev_name": "tap1" } ] }""", "vm.json: network-interfaces[1].iface_id: \"eth0\" is already the id of network-interfaces[0]" },
        { "{ " + Boot + """, "network-interfaces": [ { "iface_id": "eth0", "host_dev_name": "a-tap-name-too-long" } ] }""", "vm.json: network-interfaces[0].host_dev_name: must be a TAP name of 1 to 15 characters" },
        { "{ " + Boot + """, "balloon": { "amount_mib": 256 } }""", "vm.json: balloon.amount_mib: 256 MiB would take all of the guest's 256 MiB" },
        { "{ " + Boot + """, "balloon": { "amount_mib": 16, "deflate_on_oom": true } }""", "vm.json: balloon.deflate_on_oom: true is not supported" },
        { "{ " + Boot + """, "entropy": { "rate_limiter": null } }""", "vm.json: entropy.rate_limiter: unknown key" },
        { "{ " + Boot + """, "kvmsharp": { "transport": "usb" } }""", "vm.json: kvmsharp.transport: takes \"pci\" or \"mmio\", not \"usb\"" },
        { "{ " + Boot + """, "kvmsharp": { "console": "vga" } }""", "vm.json: kvmsharp.console: takes \"serial\" or \"virtio\"" },
        { "{ " + Boot + """, "kvmsharp": { "cpu_template": "bogus" } }""", "vm.json: kvmsharp.cpu_template: CPU template item 'bogus'" },
        { "{ " + Boot + """, "kvmsharp": { "acpi": false }, "entropy": {} }""", "vm.json: kvmsharp.acpi: false leaves no PCI bus" },
    };

    [Theory]
    [MemberData(nameof(BadFiles))]
    public void BadConfigFileGivesOneLineNamingTheJsonPathAndExitCode2(string json, string expected)
    {
        Assets.RequireBinary();
        string path = WriteConfig(json);
        AssertOneLineError(2, expected, "run", "--config", path);
    }

    [Fact]
    public void AbsentUnreadableOrNonUtf8ConfigFileIsAUsageError()
    {
        Assets.RequireBinary();
        AssertOneLineError(2, "/nonexistent/vm.json: no such file", "run", "--config", "/nonexistent/vm.json");
        AssertOneLineError(2, $"{_dir}: is a directory", "run", "--config", _dir);
        AssertOneLineError(2, "option --config needs a value", "run", "--config");
        string latin1 = Path.Combine(_dir, "latin1.json");
        File.WriteAllBytes(latin1, [.. "{\"boot-source\": {\"kernel_image_path\": \"k"u8, 0xE9, .. "\"}}"u8]);
        AssertOneLineError(2, "latin1.json: is not UTF-8 text", "run", "--config", latin1);
    }

    [Fact]
    public void ConfigFileCannotBeMixedWithOtherOptions()
    {
        Assets.RequireBinary();
        string path = WriteConfig("{ " + Boot + " }");
        AssertOneLineError(2, "--config FILE cannot be combined with other run options", "run", "--config", path, "--cpus", "2");
        AssertOneLineError(2, "--config FILE cannot be combined with other run options", "run", "--memory", "64M", "--config", path);
    }

    [Fact]
    public void MissingFilesNamedByTheConfigResolveAgainstItsDirectoryAndExitWith1()
    {
        Assets.RequireBinary();
        // Exit 1 as for `--kernel /nonexistent` on the command line; usage errors still come first.
        string path = WriteConfig("{ " + Boot + """, "drives": [ { "drive_id": "root", "path_on_host": "disks/root.img" } ] }""");
        AssertOneLineError(1, $"vm.json: drives[0].path_on_host: {Path.Combine(_dir, "disks", "root.img")} does not exist", "run", "--config", path);
        path = WriteConfig("""{ "boot-source": { "kernel_image_path": "no-kernel" }, "machine-config": { "vcpu_count": 0, "mem_size_mib": 64 } }""");
        AssertOneLineError(2, "vm.json: machine-config.vcpu_count: must be from 1 to 64", "run", "--config", path);
    }

    [Theory]
    [InlineData(1, "pci", true)]
    [InlineData(3, "pci", true)]
    [InlineData(3, "mmio", false)] // virtio-mmio needs no PCI: entropy and a disk without ACPI
    public void GoodConfigFileDrivesATinyGuestWithItsVcpuCount(int vcpus, string transport, bool acpi)
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        string elf = TinyElf.Write(ReportCpuCount);
        File.Move(elf, Path.Combine(_dir, "guest.elf"));
        File.WriteAllBytes(Path.Combine(_dir, "disk.raw"), new byte[1 << 20]);
        // Firecracker's shape, with kvmsharp's extras in their own section; relative paths are
        // relative to the file (the process runs elsewhere).
        string path = Path.Combine(_dir, "vm.json");
        File.WriteAllText(path, $$"""
            {
              "boot-source": { "kernel_image_path": "guest.elf", "boot_args": "console=ttyS0", "initrd_path": null },
              "drives": [ { "drive_id": "scratch", "path_on_host": "disk.raw", "is_root_device": false, "is_read_only": true } ],
              "machine-config": { "vcpu_count": {{vcpus}}, "mem_size_mib": 64, "smt": false, "huge_pages": "None" },
              "balloon": null,
              "entropy": {},
              "kvmsharp": { "debug_exit": true, "transport": "{{transport}}", "acpi": {{(acpi ? "true" : "false")}} }
            }
            """);
        var (code, _, stderr) = KvmSharpProcess.RunToEnd(Quick, "run", "--config", path);
        // The guest writes CPUID.0xB.1:EBX (the vCPU count) to the debug-exit port: exit (n << 1) | 1.
        Assert.True(code == (vcpus << 1 | 1), $"exit code {code}, expected {vcpus << 1 | 1}: {stderr}");
    }

    [Fact]
    public void TransportOptionTakesPciOrMmio()
    {
        Assets.RequireBinary();
        AssertOneLineError(2, "--transport takes pci or mmio, not 'usb'", "run", "--kernel", "/etc/passwd", "--transport", "usb");
        AssertOneLineError(2, "option --transport needs a value", "run", "--kernel", "/etc/passwd", "--transport");
    }

    [Fact]
    public void TransportMmioReachesTheVm()
    {
        Assets.RequireBinary();
        Assets.RequireKvm();
        string elf = TinyElf.Write(TinyElf.DebugExitCode(0x21));
        try
        {
            // Without ACPI there is no PCI: a virtio device is only accepted on virtio-mmio (a usage
            // error, as the same inconsistency in a config file is).
            string[] args = ["run", "--kernel", elf, "--memory", "64M", "--debug-exit", "--no-acpi", "--rng"];
            AssertOneLineError(2, "--transport mmio", args);
            var (code, _, stderr) = KvmSharpProcess.RunToEnd(Quick, [.. args, "--transport", "mmio"]);
            Assert.True((0x21 << 1 | 1) == code, $"exit code {code}: {stderr}");
        }
        finally
        {
            File.Delete(elf);
        }
    }

    private static void AssertOneLineError(int expectedCode, string expectedText, params string[] args)
    {
        var (code, stdout, stderr) = KvmSharpProcess.RunToEnd(Quick, args);
        Assert.True(expectedCode == code, $"exit code {code}, expected {expectedCode}: {stderr}");
        Assert.Contains(expectedText, stderr, StringComparison.Ordinal);
        Assert.Single(stderr.Trim().Split('\n'));
        Assert.DoesNotContain("   at ", stderr); // no stack trace
        Assert.Equal("", stdout);
    }
}
