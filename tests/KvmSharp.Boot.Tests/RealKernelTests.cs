using Xunit;

namespace KvmSharp.Boot.Tests;

/// <summary>
/// Runs against a real distribution kernel when one is on the machine: $KVMSHARP_TEST_KERNEL,
/// guest/out/distro/vmlinuz (made by the guest/ script), or a Debian linux-image unpacked with
/// dpkg -x under /tmp/dk. Skipped otherwise.
/// </summary>
public class RealKernelTests
{
    private static string? FindKernel()
    {
        var candidates = new List<string>();
        if (Environment.GetEnvironmentVariable("KVMSHARP_TEST_KERNEL") is { Length: > 0 } env)
            candidates.Add(env);
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string p = Path.Combine(dir.FullName, "guest", "out", "distro", "vmlinuz");
            if (File.Exists(p))
            {
                candidates.Add(p);
                break;
            }
        }
        if (Directory.Exists("/tmp/dk/boot"))
            candidates.AddRange(Directory.GetFiles("/tmp/dk/boot", "vmlinuz-*"));
        return candidates.FirstOrDefault(File.Exists);
    }

    [Fact]
    public void Distro_bzImage_payload_decompresses_to_an_elf_with_a_pvh_note()
    {
        string? path = FindKernel();
        if (path is null)
            Assert.Skip("No real kernel found (set KVMSHARP_TEST_KERNEL, run the guest/ script, or dpkg -x a linux-image package into /tmp/dk).");
        var k = KernelImage.Load(path);
        Assert.Equal(KernelFormat.BzImage, k.Format);
        Assert.True(k.BootProtocolVersion >= 0x020c);
        Assert.NotNull(k.Compression);
        Assert.True(k.HasPvhEntry, "the distro kernel's decompressed payload should carry XEN_ELFNOTE_PHYS32_ENTRY");
        Assert.True(ElfKernelHasMagic(k.ElfBytes));
        Assert.Equal(0x1000000UL, k.Elf.LowestAddress);

        using var mem = Mem.Create(256 * Mem.MiB);
        var r = LinuxLoader.Load(mem, k, new BootOptions { CommandLine = "console=ttyS0", Initrd = new byte[1 << 20], PreferPvh = true });
        Assert.Equal(BootEntryMode.Pvh32, r.Mode);
        Assert.True(r.InitrdAddress >= r.KernelEnd);
        var r64 = LinuxLoader.Load(mem, k, new BootOptions { CommandLine = "console=ttyS0" });
        Assert.Equal(BootEntryMode.Long64, r64.Mode);
        Assert.Equal(k.Elf.Entry, r64.EntryPoint);
    }

    private static bool ElfKernelHasMagic(byte[] b) => b.Length > 4 && b[0] == 0x7f && b[1] == 'E' && b[2] == 'L' && b[3] == 'F';
}
