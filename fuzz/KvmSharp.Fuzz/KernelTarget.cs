using KvmSharp.Boot;
using KvmSharp.Memory;

namespace KvmSharp.Fuzz;

/// <summary>
/// Fuzz target "kernel": the bytes are a kernel file (bzImage or ELF vmlinux). It is parsed, then
/// loaded into 64 MiB of guest memory twice: decompressed by the VMM with a PVH preference and an
/// initrd, and by the classic 64-bit boot protocol. Returns null when either load succeeded. The documented outcome for bad input is
/// <see cref="BootException"/>; anything else (GuestMemoryException = an unchecked placement) is a crash.
/// Shared, as source, with tests/KvmSharp.Boot.Tests/FuzzRegressionTests.cs.
/// </summary>
internal static class KernelTarget
{
    private static readonly byte[] Initrd = new byte[4096];

    public static string? Run(ReadOnlySpan<byte> data, GuestMemory memory)
    {
        KernelImage kernel;
        try
        {
            kernel = KernelImage.Parse(data.ToArray(), "fuzz");
            _ = kernel.HasPvhEntry;
            _ = kernel.ToString();
        }
        catch (BootException e)
        {
            return e.Message;
        }
        // Each way to boot on its own: a kernel refused by one may still load by the other.
        string? vmm = Load(memory, kernel, new BootOptions { CommandLine = "console=ttyS0", Initrd = Initrd, PreferPvh = true, CpuCount = 2 });
        string? classic = Load(memory, kernel, new BootOptions { CommandLine = "console=ttyS0", DecompressInVmm = false });
        return vmm is null || classic is null ? null : vmm;
    }

    private static string? Load(GuestMemory memory, KernelImage kernel, BootOptions options)
    {
        try
        {
            LinuxLoader.Load(memory, kernel, options);
            return null;
        }
        catch (BootException e)
        {
            return e.Message;
        }
    }

    public static GuestMemory CreateMemory() => GuestMemory.CreateForTesting(MemoryLayout.RamRanges(64UL << 20));
}
