using KvmSharp.Memory;

namespace KvmSharp.Boot;

/// <summary>e820 address range types (ACPI 6.5 §15, "Address Range Types"; Linux e820/types.h).</summary>
public enum E820Type : uint
{
    Ram = 1,
    Reserved = 2,
    Acpi = 3,
    Nvs = 4,
    Unusable = 5,
}

/// <summary>One e820 entry: struct boot_e820_entry { u64 addr; u64 size; u32 type; } (20 bytes, packed).</summary>
public readonly record struct E820Entry(ulong Address, ulong Size, E820Type Type)
{
    public ulong End => Address + Size;
}

/// <summary>
/// Builds the BIOS-style memory map the kernel sees (zero page e820_table, or the PVH memmap).
/// The first RAM region is split around the legacy hole: usable [0, 0x9FC00), reserved
/// [0x9FC00, 1 MiB) — the EBDA (holding our MP table), VGA and BIOS areas, which are backed by RAM but
/// must not be used as such — then usable [1 MiB, end). Every other region is usable as a whole.
/// </summary>
public static class E820
{
    /// <summary>E820_MAX_ENTRIES_ZEROPAGE: room in boot_params.e820_table.</summary>
    public const int MaxEntries = 128;

    /// <summary>Start of the Extended BIOS Data Area: the last KiB below 640 KiB.</summary>
    public const ulong EbdaStart = 0x9FC00;

    public const ulong HighMemoryStart = 0x100000;

    /// <summary>The map for <paramref name="memory"/>'s regions.</summary>
    /// <exception cref="BootException">The first region does not start at 0 or is smaller than 1 MiB, or the map has too many entries.</exception>
    public static IReadOnlyList<E820Entry> Build(GuestMemory memory)
    {
        ArgumentNullException.ThrowIfNull(memory);
        var ranges = new List<(GuestAddress, ulong)>();
        foreach (var r in memory.Regions)
            ranges.Add((r.Start, r.Size));
        return Build(ranges);
    }

    /// <summary>The map for RAM ranges as returned by <see cref="MemoryLayout.RamRanges"/> (sorted, non-overlapping).</summary>
    /// <exception cref="BootException">The first range does not start at 0 or is smaller than 1 MiB, or the map has too many entries.</exception>
    public static IReadOnlyList<E820Entry> Build(IReadOnlyList<(GuestAddress Start, ulong Size)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        if (ranges.Count == 0 || ranges[0].Start.Value != 0)
            throw new BootException("Guest RAM must start at address 0 for a Linux boot.");
        if (ranges[0].Size <= HighMemoryStart)
            throw new BootException($"Memory ({ranges[0].Size >> 10} KiB) is too small: the first RAM region must extend above 1 MiB.");
        var map = new List<E820Entry>
        {
            new(0, EbdaStart, E820Type.Ram),
            new(EbdaStart, HighMemoryStart - EbdaStart, E820Type.Reserved),
            new(HighMemoryStart, ranges[0].Size - HighMemoryStart, E820Type.Ram),
        };
        for (int i = 1; i < ranges.Count; i++)
            map.Add(new E820Entry(ranges[i].Start.Value, ranges[i].Size, E820Type.Ram));
        if (map.Count > MaxEntries)
            throw new BootException($"The guest memory map has {map.Count} entries; the zero page holds at most {MaxEntries}.");
        return map;
    }
}
