namespace KvmSharp.Boot;

/// <summary>
/// Where the loader puts its boot structures in guest-physical memory below 1 MiB. All of it lies in
/// the e820 usable range [0, 0x9FC00) except the MP table, which is in the reserved EBDA. The kernel
/// itself goes at or above 1 MiB (16 MiB for a normal vmlinux), the initrd as high as allowed below 4 GiB.
/// README.md has the same map as a table; <c>LowMemoryTests</c> checks that nothing overlaps.
/// </summary>
public static class LowMemory
{
    /// <summary>GDT: up to 8 descriptors (64 bytes). [0x500, 0x540).</summary>
    public const ulong Gdt = 0x500;
    public const int GdtMaxBytes = 0x40;

    /// <summary>PVH struct hvm_start_info (56 bytes). [0x6000, 0x6038).</summary>
    public const ulong PvhStartInfo = 0x6000;

    /// <summary>PVH struct hvm_modlist_entry for the initrd (32 bytes). [0x6040, 0x6060).</summary>
    public const ulong PvhModlist = 0x6040;

    /// <summary>PVH memory map: up to 128 struct hvm_memmap_table_entry (24 bytes each). [0x6100, 0x6D00).</summary>
    public const ulong PvhMemmap = 0x6100;

    /// <summary>struct boot_params, "the zero page" (4 KiB). [0x7000, 0x8000).</summary>
    public const ulong ZeroPage = 0x7000;
    public const int ZeroPageSize = 0x1000;

    /// <summary>Boot stack page [0x8000, 0x9000); the initial stack pointer is 16 bytes below its top.</summary>
    public const ulong StackPage = 0x8000;
    public const ulong StackPointer = 0x8ff0;

    /// <summary>Identity-map page tables: PML4 [0x9000, 0xA000), PDPT [0xA000, 0xB000), 4 PDs [0xB000, 0xF000).</summary>
    public const ulong Pml4 = 0x9000;
    public const ulong Pdpt = 0xA000;
    public const ulong PageDirectories = 0xB000;
    public const int PageDirectoryCount = 4;

    /// <summary>Kernel command line, NUL-terminated: [0x20000, 0x30000) — 64 KiB, more than any kernel accepts.</summary>
    public const ulong CommandLine = 0x20000;
    public const int CommandLineCapacity = 0x10000;

    /// <summary>MP floating pointer + configuration table: [0x9FC00, ...) in the reserved EBDA (MP spec 1.4 §4).</summary>
    public const ulong MpTable = 0x9FC00;

    /// <summary>Lowest address a kernel segment or the initrd may use.</summary>
    public const ulong HighMemory = 0x100000;
}
