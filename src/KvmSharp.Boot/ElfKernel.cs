namespace KvmSharp.Boot;

/// <summary>One PT_LOAD segment of an ELF kernel: file bytes [Offset, Offset+FileSize) go to PhysicalAddress; the rest of MemorySize is zeroed.</summary>
internal readonly record struct ElfSegment(ulong Offset, ulong FileSize, ulong PhysicalAddress, ulong MemorySize);

/// <summary>
/// A validated ELF64 x86-64 executable (vmlinux). Every header field is checked with overflow-safe
/// arithmetic before use: the program-header table and each segment's file bytes lie inside the
/// file, <c>p_filesz &lt;= p_memsz</c>, and physical ranges do not wrap (ELF-64 Object File Format 1.5).
/// </summary>
internal sealed class ElfKernel
{
    private const int EhdrSize = 64;
    private const int PhdrSize = 56;
    private const ushort EtExec = 2;
    private const ushort EmX86_64 = 62;
    private const uint PtLoad = 1;
    private const uint PtNote = 4;

    /// <summary>More program headers than any kernel has; bounds the work a hostile file can cause.</summary>
    internal const int MaxProgramHeaders = 64;

    /// <summary>XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h): 32-bit physical PVH entry point.</summary>
    internal const uint XenElfNotePhys32Entry = 18;

    /// <summary>Start of the x86-64 kernel text mapping (__START_KERNEL_map).</summary>
    private const ulong KernelVirtualBase = 0xffffffff80000000;

    private ElfKernel(ElfSegment[] segments, ulong entry, ulong? pvhEntry, ulong start, ulong end)
    {
        Segments = segments;
        Entry = entry;
        PvhEntry = pvhEntry;
        LowestAddress = start;
        EndAddress = end;
    }

    public ElfSegment[] Segments { get; }

    /// <summary>Physical 64-bit entry point (startup_64).</summary>
    public ulong Entry { get; }

    /// <summary>Physical 32-bit PVH entry point, when the kernel has the Xen note.</summary>
    public ulong? PvhEntry { get; }

    public ulong LowestAddress { get; }

    /// <summary>Exclusive end of the highest segment (p_paddr + p_memsz).</summary>
    public ulong EndAddress { get; }

    public static bool HasElfMagic(ReadOnlySpan<byte> data) =>
        data.Length >= 4 && data[0] == 0x7f && data[1] == (byte)'E' && data[2] == (byte)'L' && data[3] == (byte)'F';

    /// <summary>
    /// How much of the file the loader uses: the end of the program header table and of every PT_LOAD
    /// and PT_NOTE segment's file bytes, computed without overflow. Section headers, symbols and debug
    /// info come after and are never read. Null when <paramref name="head"/> (the file's first bytes)
    /// does not hold the whole program header table: then the whole file is what counts.
    /// </summary>
    public static ulong? FileExtent(ReadOnlySpan<byte> head)
    {
        if (head.Length < EhdrSize)
            return null;
        ulong phoff = Le.U64(head, 32);
        ushort phentsize = Le.U16(head, 54);
        ushort phnum = Le.U16(head, 56);
        if (phentsize < PhdrSize || phnum > MaxProgramHeaders || phoff > (ulong)head.Length
            || (ulong)phentsize * phnum > (ulong)head.Length - phoff)
            return null;
        ulong extent = phoff + (ulong)phentsize * phnum;
        for (int i = 0; i < phnum; i++)
        {
            var ph = head.Slice((int)phoff + i * phentsize, PhdrSize);
            uint ptype = Le.U32(ph, 0);
            if (ptype != PtLoad && ptype != PtNote)
                continue;
            ulong offset = Le.U64(ph, 8);
            ulong filesz = Le.U64(ph, 32);
            extent = Math.Max(extent, filesz > ulong.MaxValue - offset ? ulong.MaxValue : offset + filesz);
        }
        return extent;
    }

    /// <exception cref="BootException">The file is not a loadable ELF64 x86-64 executable.</exception>
    public static ElfKernel Parse(ReadOnlySpan<byte> data, string name)
    {
        if (!HasElfMagic(data))
            throw new BootException($"The kernel file {name} is not an ELF file.");
        if (data.Length < EhdrSize)
            throw new BootException($"Kernel is truncated: {name} is {data.Length} bytes, shorter than an ELF64 header.");
        if (data[4] != 2)
            throw new BootException($"The kernel file {name} is not a 64-bit ELF file (EI_CLASS {data[4]}).");
        if (data[5] != 1)
            throw new BootException($"The kernel file {name} is not a little-endian ELF file (EI_DATA {data[5]}).");
        ushort type = Le.U16(data, 16);
        ushort machine = Le.U16(data, 18);
        if (machine != EmX86_64)
            throw new BootException($"The kernel file {name} is for ELF machine {machine}, not x86-64 (62).");
        if (type != EtExec)
            throw new BootException($"The kernel file {name} is ELF type {type}, not an executable (ET_EXEC).");
        ulong entry = Le.U64(data, 24);
        ulong phoff = Le.U64(data, 32);
        ushort phentsize = Le.U16(data, 54);
        ushort phnum = Le.U16(data, 56);
        if (phnum == 0)
            throw new BootException($"The kernel file {name} has no program headers.");
        if (phnum > MaxProgramHeaders)
            throw new BootException($"The kernel file {name} has {phnum} program headers; at most {MaxProgramHeaders} are accepted.");
        if (phentsize < PhdrSize)
            throw new BootException($"The kernel file {name} has program headers of {phentsize} bytes; ELF64 needs {PhdrSize}.");
        ulong tableSize = (ulong)phentsize * phnum;
        if (phoff > (ulong)data.Length || tableSize > (ulong)data.Length - phoff)
            throw new BootException($"Kernel is truncated: {name}'s program header table at offset {phoff} ({tableSize} bytes) is past the end of the {data.Length}-byte file.");

        var segments = new List<ElfSegment>();
        var loads = new List<(ulong VAddr, ulong PAddr, ulong MemSize)>();
        ulong? pvh = null;
        ulong lowest = ulong.MaxValue, end = 0;
        for (int i = 0; i < phnum; i++)
        {
            var ph = data.Slice((int)phoff + i * phentsize, PhdrSize);
            uint ptype = Le.U32(ph, 0);
            ulong offset = Le.U64(ph, 8);
            ulong vaddr = Le.U64(ph, 16);
            ulong paddr = Le.U64(ph, 24);
            ulong filesz = Le.U64(ph, 32);
            ulong memsz = Le.U64(ph, 40);
            ulong align = Le.U64(ph, 48);
            if (ptype != PtLoad && ptype != PtNote)
                continue;
            if (offset > (ulong)data.Length || filesz > (ulong)data.Length - offset)
                throw new BootException($"Kernel is truncated: {name}'s program header {i} needs file bytes [{offset}, {offset}+{filesz}) beyond the {data.Length}-byte file.");
            if (ptype == PtNote)
            {
                pvh ??= FindPvhNote(data.Slice((int)offset, (int)filesz), align == 8 ? 8 : 4, name);
                continue;
            }
            if (filesz > memsz)
                throw new BootException($"The kernel file {name}'s segment {i} has p_filesz {filesz} larger than p_memsz {memsz}.");
            if (memsz == 0)
                continue;
            if (paddr + memsz < paddr)
                throw new BootException($"The kernel file {name}'s segment {i} at physical 0x{paddr:x} of {memsz} bytes wraps around the address space.");
            segments.Add(new ElfSegment(offset, filesz, paddr, memsz));
            loads.Add((vaddr, paddr, memsz));
            lowest = Math.Min(lowest, paddr);
            end = Math.Max(end, paddr + memsz);
        }
        if (segments.Count == 0)
            throw new BootException($"The kernel file {name} has no loadable (PT_LOAD) segments.");

        ulong physEntry = ToPhysical(entry, loads)
            ?? throw new BootException($"The kernel file {name}'s entry point 0x{entry:x} is not inside any loadable segment.");
        if (pvh is { } p && !InsideLoad(p, loads))
            throw new BootException($"The kernel file {name}'s PVH entry point 0x{p:x} is not inside any loadable segment.");
        return new ElfKernel([.. segments], physEntry, pvh, lowest, end);
    }

    private static bool InsideLoad(ulong pa, List<(ulong VAddr, ulong PAddr, ulong MemSize)> loads)
    {
        foreach (var l in loads)
        {
            if (pa >= l.PAddr && pa - l.PAddr < l.MemSize)
                return true;
        }
        return false;
    }

    /// <summary>
    /// vmlinux's e_entry is already physical (ENTRY(phys_startup_64) in vmlinux.lds.S); an entry in
    /// the kernel text mapping is translated through the segment that contains it.
    /// </summary>
    private static ulong? ToPhysical(ulong entry, List<(ulong VAddr, ulong PAddr, ulong MemSize)> loads)
    {
        if (entry >= KernelVirtualBase)
        {
            foreach (var l in loads)
            {
                if (entry >= l.VAddr && entry - l.VAddr < l.MemSize)
                    return l.PAddr + (entry - l.VAddr);
            }
            return null;
        }
        return InsideLoad(entry, loads) ? entry : null;
    }

    /// <summary>Walks an ELF note segment for ("Xen", XEN_ELFNOTE_PHYS32_ENTRY); the value is 4 or 8 bytes (Linux emits _ASM_PTR).</summary>
    private static ulong? FindPvhNote(ReadOnlySpan<byte> notes, int align, string name)
    {
        int pos = 0;
        while (notes.Length - pos >= 12)
        {
            uint namesz = Le.U32(notes, pos);
            uint descsz = Le.U32(notes, pos + 4);
            uint ntype = Le.U32(notes, pos + 8);
            pos += 12;
            ulong nameSpan = AlignUp(namesz, align);
            ulong descSpan = AlignUp(descsz, align);
            if (nameSpan > (ulong)(notes.Length - pos) || descSpan > (ulong)(notes.Length - pos) - nameSpan)
                return null; // a malformed note ends the walk; the kernel just has no PVH entry we can trust
            var noteName = notes.Slice(pos, (int)namesz);
            var desc = notes.Slice(pos + (int)nameSpan, (int)descsz);
            pos += (int)(nameSpan + descSpan);
            if (ntype == XenElfNotePhys32Entry && noteName.Length >= 3 && noteName[..3].SequenceEqual("Xen"u8)
                && (noteName.Length == 3 || noteName[3] == 0))
            {
                ulong value = descsz switch
                {
                    4 => Le.U32(desc, 0),
                    8 => Le.U64(desc, 0),
                    _ => throw new BootException($"The kernel file {name} has a PVH entry note of {descsz} bytes; 4 or 8 expected."),
                };
                if (value > uint.MaxValue)
                    throw new BootException($"The kernel file {name}'s PVH entry point 0x{value:x} is above 4 GiB.");
                return value;
            }
        }
        return null;
    }

    private static ulong AlignUp(uint v, int align) => ((ulong)v + (ulong)align - 1) & ~((ulong)align - 1);
}
