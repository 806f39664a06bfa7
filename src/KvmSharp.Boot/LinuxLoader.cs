using System.Text;
using KvmSharp.Memory;

namespace KvmSharp.Boot;

/// <summary>
/// Loads a Linux kernel, its command line and initrd into guest memory and writes the boot
/// structures for the chosen entry mode (Linux boot protocol, Documentation/arch/x86/boot.rst;
/// Xen PVH, xen/include/public/arch-x86/hvm/start_info.h). Writes go only through
/// <see cref="GuestMemory"/>; every placement is checked against guest RAM first.
/// </summary>
public static class LinuxLoader
{
    // struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h).
    private const int BpAcpiRsdpAddr = 0x070;
    private const int BpExtRamdiskImage = 0x0c0;
    private const int BpExtRamdiskSize = 0x0c4;
    private const int BpExtCmdLinePtr = 0x0c8;
    private const int BpE820Entries = 0x1e8;
    private const int BpE820Table = 0x2d0;
    private const int HdrBootFlag = 0x1fe;
    private const int HdrHeader = 0x202;
    private const int HdrVersion = 0x206;
    private const int HdrTypeOfLoader = 0x210;
    private const int HdrLoadFlags = 0x211;
    private const int HdrRamdiskImage = 0x218;
    private const int HdrRamdiskSize = 0x21c;
    private const int HdrHeapEndPtr = 0x224;
    private const int HdrCmdLinePtr = 0x228;
    private const int HdrInitrdAddrMax = 0x22c;
    private const int HdrKernelAlignment = 0x230;
    private const int HdrCmdlineSize = 0x238;

    private const byte LoaderTypeUndefined = 0xff; // boot.rst type_of_loader: 0xFF = no assigned id
    private const byte LoadedHigh = 0x01;
    private const byte CanUseHeap = 0x80;
    private const ushort XlfKernel64 = 0x1;

    /// <summary>Offset of the 64-bit entry point (startup_64) from the protected-mode load address (boot.rst "64-bit BOOT PROTOCOL").</summary>
    private const ulong Entry64Offset = 0x200;

    private const ulong FourGiB = 1UL << 32;
    private const ulong PageSize = 4096;

    // hvm_start_info (start_info.h).
    private const uint HvmStartMagic = 0x336ec578;

    // GDT descriptors (Intel SDM Vol. 3A §3.4.5): flat, base 0, 4 GiB limit.
    internal const ulong GdtCode32 = 0x00cf9b000000ffff;
    internal const ulong GdtCode64 = 0x00af9b000000ffff;
    internal const ulong GdtData = 0x00cf93000000ffff;
    internal const ulong GdtTss = 0x00008b0000000067; // busy TSS (type 11), base 0, limit 0x67

    /// <summary>Loads the kernel and writes everything it needs to start.</summary>
    /// <exception cref="BootException">The kernel, command line or initrd do not fit, or the kernel cannot be booted this way.</exception>
    public static BootResult Load(GuestMemory memory, KernelImage kernel, BootOptions options)
    {
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(kernel);
        ArgumentNullException.ThrowIfNull(options);
        if (options.CpuCount < 1 || options.CpuCount > MpTable.MaxCpus)
            throw new BootException($"CPU count {options.CpuCount} is out of range; 1 to {MpTable.MaxCpus} are supported.");

        var map = E820.Build(memory);
        ulong lowRamEnd = memory.Regions[0].End;
        byte[] cmdline = EncodeCommandLine(options.CommandLine ?? "", kernel);

        // 1. The kernel.
        ulong entry, kernelEnd;
        BootEntryMode mode = BootEntryMode.Long64;
        bool classic = kernel.Format == KernelFormat.BzImage && !options.DecompressInVmm;
        if (classic)
        {
            (entry, kernelEnd) = LoadCompressed(memory, kernel);
        }
        else
        {
            var elf = kernel.Elf;
            LoadElf(memory, elf, kernel.ElfBytes, kernel.Name);
            kernelEnd = elf.EndAddress;
            entry = elf.Entry;
            if (options.PreferPvh && elf.PvhEntry is { } pvh)
            {
                mode = BootEntryMode.Pvh32;
                entry = pvh;
            }
        }

        // 2. Command line.
        memory.Write(new GuestAddress(LowMemory.CommandLine), cmdline);

        // 3. Initrd: as high as the kernel allows, below the MMIO hole / 4 GiB, above the kernel.
        ulong initrdAddr = 0, initrdSize = 0;
        if (options.Initrd is { Size: > 0 } initrd)
        {
            initrdSize = initrd.Size;
            ulong limit = Math.Min(Math.Min((ulong)kernel.InitrdAddressMax + 1, lowRamEnd), FourGiB);
            ulong lowest = AlignUp(Math.Max(kernelEnd, LowMemory.HighMemory), PageSize);
            if (initrdSize > limit || (initrdAddr = (limit - initrdSize) & ~(PageSize - 1)) < lowest)
                throw new BootException($"Memory ({memory.TotalSize >> 20} MiB) is too small for kernel + initrd (the kernel ends at 0x{kernelEnd:x}, the {initrdSize}-byte initrd must end below 0x{limit:x}).");
            initrd.CopyTo(memory, new GuestAddress(initrdAddr));
        }

        // 4. Boot information, GDT and page tables for the entry mode.
        ulong[] gdt;
        ulong bootInfo, cr3 = 0;
        ushort cs, ds, tr;
        if (mode == BootEntryMode.Pvh32)
        {
            bootInfo = WritePvhStartInfo(memory, map, initrdAddr, initrdSize, options.AcpiRsdpAddress ?? 0);
            gdt = [0, GdtCode32, GdtData, GdtTss];
            (cs, ds, tr) = (0x08, 0x10, 0x18);
        }
        else
        {
            bootInfo = WriteZeroPage(memory, kernel, map, initrdAddr, initrdSize, options.AcpiRsdpAddress ?? 0);
            cr3 = WriteIdentityPageTables(memory);
            // 0x10/0x18 are __BOOT_CS/__BOOT_DS (boot.rst 64-bit protocol); the 64-bit TSS descriptor takes two slots.
            gdt = [0, GdtCode32, GdtCode64, GdtData, GdtTss, 0];
            (cs, ds, tr) = (0x10, 0x18, 0x20);
        }
        byte[] gdtBytes = new byte[gdt.Length * 8];
        for (int i = 0; i < gdt.Length; i++)
            Le.W64(gdtBytes, i * 8, gdt[i]);
        memory.Write(new GuestAddress(LowMemory.Gdt), gdtBytes);
        memory.TryZero(new GuestAddress(LowMemory.StackPage), PageSize);

        if (options.WriteMpTable)
            MpTable.Write(memory, options.CpuCount);

        return new BootResult(mode, entry, bootInfo, cr3, LowMemory.Gdt, (ushort)(gdtBytes.Length - 1), LowMemory.StackPointer)
        {
            GdtEntries = gdt,
            CodeSelector = cs,
            DataSelector = ds,
            TssSelector = tr,
            KernelEnd = kernelEnd,
            InitrdAddress = initrdAddr,
            InitrdSize = initrdSize,
            MemoryMap = map,
        };
    }

    /// <summary>ASCII bytes plus the NUL, checked against the kernel's cmdline_size and our 64 KiB slot.</summary>
    private static byte[] EncodeCommandLine(string text, KernelImage kernel)
    {
        foreach (char c in text)
        {
            if (c == '\0' || c > 0x7e || (c < 0x20 && c != '\t' && c != '\n'))
                throw new BootException($"The command line contains character U+{(int)c:X4}; only printable ASCII is accepted.");
        }
        byte[] bytes = Encoding.ASCII.GetBytes(text + "\0");
        ulong max = Math.Min(kernel.CommandLineMax, (ulong)LowMemory.CommandLineCapacity - 1);
        if ((ulong)text.Length > max)
            throw new BootException($"Command line is {text.Length} bytes; this kernel accepts at most {max}.");
        return bytes;
    }

    private static void CheckPlacement(GuestMemory memory, ulong start, ulong size, string what, string name)
    {
        if (start < LowMemory.HighMemory)
            throw new BootException($"The kernel {name}'s {what} at 0x{start:x} is below 1 MiB, where the boot structures live.");
        if (start + size < start || start + size > FourGiB)
            throw new BootException($"The kernel {name}'s {what} at 0x{start:x} ({size} bytes) extends above 4 GiB.");
        if (!memory.IsValidRange(new GuestAddress(start), size))
            throw new BootException($"Memory ({memory.TotalSize >> 20} MiB) is too small for the kernel {name}: its {what} needs [0x{start:x}, 0x{start + size:x}).");
    }

    private static void LoadElf(GuestMemory memory, ElfKernel elf, byte[] file, string name)
    {
        // Check every segment before writing any, so a failure leaves guest memory untouched.
        for (int i = 0; i < elf.Segments.Length; i++)
        {
            var s = elf.Segments[i];
            CheckPlacement(memory, s.PhysicalAddress, s.MemorySize, $"segment {i}", name);
        }
        foreach (var s in elf.Segments)
        {
            memory.Write(new GuestAddress(s.PhysicalAddress), file.AsSpan((int)s.Offset, (int)s.FileSize));
            // Zero the BSS here: the guest would spend seconds on it where ring 0 is emulated.
            if (s.MemorySize > s.FileSize && !memory.TryZero(new GuestAddress(s.PhysicalAddress + s.FileSize), s.MemorySize - s.FileSize))
                throw new BootException($"The kernel {name}'s segment at 0x{s.PhysicalAddress:x} cannot be zeroed.");
        }
    }

    /// <summary>The classic protocol: the protected-mode part goes to its load address; entry = load + 0x200.</summary>
    private static (ulong Entry, ulong End) LoadCompressed(GuestMemory memory, KernelImage kernel)
    {
        if (kernel.BootProtocolVersion < 0x020c || (kernel.XLoadFlags & XlfKernel64) == 0)
            throw new BootException($"The kernel {kernel.Name} (boot protocol {KernelImage.Version(kernel.BootProtocolVersion)}) has no 64-bit entry point (needs protocol 2.12+ with XLF_KERNEL_64); boot it with in-VMM decompression.");
        ulong load = kernel.PreferredAddress;
        if (kernel.Relocatable)
        {
            ulong align = kernel.KernelAlignment;
            if (align == 0 || (align & (align - 1)) != 0)
                throw new BootException($"The kernel {kernel.Name} has kernel_alignment 0x{align:x}, which is not a power of two.");
            load = AlignUp(Math.Max(load, LowMemory.HighMemory), align);
        }
        var pm = kernel.ProtectedModeCode;
        ulong footprint = Math.Max((ulong)pm.Length, kernel.InitSize);
        CheckPlacement(memory, load, footprint, "protected-mode code", kernel.Name);
        memory.Write(new GuestAddress(load), pm);
        return (load + Entry64Offset, load + footprint);
    }

    private static ulong WriteZeroPage(GuestMemory memory, KernelImage kernel, IReadOnlyList<E820Entry> map, ulong initrdAddr, ulong initrdSize, ulong rsdp)
    {
        byte[] zp = new byte[LowMemory.ZeroPageSize];
        if (kernel.Format == KernelFormat.BzImage)
        {
            // boot.rst: copy the setup header from the kernel image into boot_params, then fill in
            // the fields the boot loader owns. Everything else (incl. the sentinel at 0x1ef) stays 0.
            kernel.SetupHeader.CopyTo(zp.AsSpan(KernelImage.SetupHeaderOffset));
        }
        else
        {
            // An ELF vmlinux has no setup header: write the fields the kernel checks (as Firecracker does).
            Le.W16(zp, HdrBootFlag, KernelImage.BootFlagMagic);
            Le.W32(zp, HdrHeader, KernelImage.HdrSMagic);
            Le.W16(zp, HdrVersion, 0x020f);
            Le.W32(zp, HdrKernelAlignment, 0x1000000);
            Le.W32(zp, HdrInitrdAddrMax, kernel.InitrdAddressMax);
            Le.W32(zp, HdrCmdlineSize, KernelImage.ElfCommandLineMax); // without the NUL (boot.rst cmdline_size)
            zp[HdrLoadFlags] = LoadedHigh;
        }
        zp[HdrTypeOfLoader] = LoaderTypeUndefined;
        zp[HdrLoadFlags] |= CanUseHeap;
        Le.W16(zp, HdrHeapEndPtr, 0xfe00); // boot.rst: setup heap end, relative to the real-mode start, minus 0x200
        Le.W32(zp, HdrCmdLinePtr, (uint)LowMemory.CommandLine);
        Le.W32(zp, BpExtCmdLinePtr, 0);
        Le.W32(zp, HdrRamdiskImage, (uint)initrdAddr);  // initrd is placed below 4 GiB: ext_ fields stay 0
        Le.W32(zp, HdrRamdiskSize, (uint)initrdSize);
        Le.W32(zp, BpExtRamdiskImage, 0);
        Le.W32(zp, BpExtRamdiskSize, 0);
        Le.W64(zp, BpAcpiRsdpAddr, rsdp);
        zp[BpE820Entries] = (byte)map.Count;
        for (int i = 0; i < map.Count; i++)
        {
            int o = BpE820Table + i * 20;
            Le.W64(zp, o, map[i].Address);
            Le.W64(zp, o + 8, map[i].Size);
            Le.W32(zp, o + 16, (uint)map[i].Type);
        }
        memory.Write(new GuestAddress(LowMemory.ZeroPage), zp);
        return LowMemory.ZeroPage;
    }

    /// <summary>PML4 → PDPT → 4 page directories of 2 MiB pages: identity map of [0, 4 GiB).</summary>
    private static ulong WriteIdentityPageTables(GuestMemory memory)
    {
        const ulong Present = 1, Writable = 2, PageSize2M = 0x80;
        byte[] pml4 = new byte[PageSize];
        Le.W64(pml4, 0, LowMemory.Pdpt | Present | Writable);
        byte[] pdpt = new byte[PageSize];
        byte[] pds = new byte[PageSize * LowMemory.PageDirectoryCount];
        for (int i = 0; i < LowMemory.PageDirectoryCount; i++)
        {
            Le.W64(pdpt, i * 8, (LowMemory.PageDirectories + (ulong)i * PageSize) | Present | Writable);
            for (int j = 0; j < 512; j++)
            {
                ulong phys = ((ulong)i * 512 + (ulong)j) << 21;
                Le.W64(pds, (i * 512 + j) * 8, phys | Present | Writable | PageSize2M);
            }
        }
        memory.Write(new GuestAddress(LowMemory.Pml4), pml4);
        memory.Write(new GuestAddress(LowMemory.Pdpt), pdpt);
        memory.Write(new GuestAddress(LowMemory.PageDirectories), pds);
        return LowMemory.Pml4;
    }

    /// <summary>struct hvm_start_info version 1 with the initrd as module 0 and the e820 map as memmap.</summary>
    private static ulong WritePvhStartInfo(GuestMemory memory, IReadOnlyList<E820Entry> map, ulong initrdAddr, ulong initrdSize, ulong rsdp)
    {
        byte[] si = new byte[56];
        Le.W32(si, 0, HvmStartMagic);
        Le.W32(si, 4, 1);                       // version 1: memmap fields present
        Le.W32(si, 8, 0);                       // flags
        Le.W32(si, 12, initrdSize > 0 ? 1u : 0u); // nr_modules
        Le.W64(si, 16, initrdSize > 0 ? LowMemory.PvhModlist : 0);
        Le.W64(si, 24, LowMemory.CommandLine);  // cmdline_paddr
        Le.W64(si, 32, rsdp);                   // rsdp_paddr (0 = none)
        Le.W64(si, 40, LowMemory.PvhMemmap);
        Le.W32(si, 48, (uint)map.Count);
        if (initrdSize > 0)
        {
            byte[] mod = new byte[32]; // hvm_modlist_entry: paddr, size, cmdline_paddr, reserved
            Le.W64(mod, 0, initrdAddr);
            Le.W64(mod, 8, initrdSize);
            memory.Write(new GuestAddress(LowMemory.PvhModlist), mod);
        }
        byte[] mm = new byte[map.Count * 24]; // hvm_memmap_table_entry: addr, size, type, reserved
        for (int i = 0; i < map.Count; i++)
        {
            Le.W64(mm, i * 24, map[i].Address);
            Le.W64(mm, i * 24 + 8, map[i].Size);
            Le.W32(mm, i * 24 + 16, (uint)map[i].Type); // XEN_HVM_MEMMAP_TYPE_* equal the e820 types
        }
        memory.Write(new GuestAddress(LowMemory.PvhMemmap), mm);
        memory.Write(new GuestAddress(LowMemory.PvhStartInfo), si);
        return LowMemory.PvhStartInfo;
    }

    private static ulong AlignUp(ulong v, ulong align) =>
        v > ulong.MaxValue - (align - 1)
            ? throw new BootException($"Address 0x{v:x} cannot be aligned to 0x{align:x} without overflowing.")
            : (v + align - 1) & ~(align - 1);
}
