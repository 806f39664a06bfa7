using KvmSharp.Memory;
using Xunit;

namespace KvmSharp.Boot.Tests;

public class E820Tests
{
    private const ulong MiB = 1UL << 20, GiB = 1UL << 30;

    [Fact]
    public void Map_for_128_MiB()
    {
        var map = E820.Build(MemoryLayout.RamRanges(128 * MiB));
        Assert.Equal(
            [new E820Entry(0, 0x9fc00, E820Type.Ram), new E820Entry(0x9fc00, 0x60400, E820Type.Reserved), new E820Entry(0x100000, 127 * MiB, E820Type.Ram)],
            map);
    }

    [Fact]
    public void Map_for_3_GiB_ends_at_the_mmio_hole()
    {
        var map = E820.Build(MemoryLayout.RamRanges(3 * GiB));
        Assert.Equal(3, map.Count);
        Assert.Equal(new E820Entry(0x100000, 3 * GiB - MiB, E820Type.Ram), map[2]);
        Assert.Equal(3 * GiB, map[2].End);
    }

    [Fact]
    public void Map_for_5_GiB_has_ram_above_4_GiB()
    {
        var map = E820.Build(MemoryLayout.RamRanges(5 * GiB));
        Assert.Equal(4, map.Count);
        Assert.Equal(new E820Entry(0x100000, 3 * GiB - MiB, E820Type.Ram), map[2]);
        Assert.Equal(new E820Entry(4 * GiB, 2 * GiB, E820Type.Ram), map[3]);
        ulong ram = map.Where(e => e.Type == E820Type.Ram).Aggregate(0UL, (s, e) => s + e.Size);
        Assert.Equal(5 * GiB - (MiB - 0x9fc00), ram); // all RAM but the reserved legacy hole
    }

    [Fact]
    public void Map_is_sorted_and_non_overlapping_and_covers_memory()
    {
        foreach (ulong size in new[] { 2 * MiB, 128 * MiB, 3 * GiB, 3 * GiB + 4096, 5 * GiB, 64 * GiB })
        {
            var ranges = MemoryLayout.RamRanges(size);
            var map = E820.Build(ranges);
            for (int i = 1; i < map.Count; i++)
                Assert.True(map[i - 1].End <= map[i].Address);
            Assert.Equal(size, map.Aggregate(0UL, (s, e) => s + e.Size));
            foreach (var e in map)
                Assert.Contains(ranges, r => e.Address >= r.Start.Value && e.End <= r.Start.Value + r.Size);
        }
    }

    [Fact]
    public void Memory_too_small_or_not_at_zero_is_rejected()
    {
        Assert.Throws<BootException>(() => E820.Build([(new GuestAddress(0), MiB)]));
        Assert.Throws<BootException>(() => E820.Build([(new GuestAddress(MiB), 64 * MiB)]));
    }

    [Fact]
    public void Build_from_guest_memory_matches_ranges()
    {
        using var m = Mem.Create(64 * MiB);
        Assert.Equal(E820.Build(MemoryLayout.RamRanges(64 * MiB)), E820.Build(m));
    }
}

public class LowMemoryTests
{
    [Fact]
    public void Boot_structures_do_not_overlap_and_sit_in_the_right_e820_ranges()
    {
        var areas = new (string Name, ulong Start, ulong Size)[]
        {
            ("gdt", LowMemory.Gdt, LowMemory.GdtMaxBytes),
            ("pvh start_info", LowMemory.PvhStartInfo, 56),
            ("pvh modlist", LowMemory.PvhModlist, 32),
            ("pvh memmap", LowMemory.PvhMemmap, E820.MaxEntries * 24),
            ("zero page", LowMemory.ZeroPage, LowMemory.ZeroPageSize),
            ("stack", LowMemory.StackPage, 0x1000),
            ("pml4", LowMemory.Pml4, 0x1000),
            ("pdpt", LowMemory.Pdpt, 0x1000),
            ("pds", LowMemory.PageDirectories, 0x1000UL * LowMemory.PageDirectoryCount),
            ("cmdline", LowMemory.CommandLine, LowMemory.CommandLineCapacity),
            ("mptable", LowMemory.MpTable, (ulong)MpTable.Size(MpTable.MaxCpus)),
        };
        for (int i = 0; i < areas.Length; i++)
        {
            for (int j = i + 1; j < areas.Length; j++)
            {
                var a = areas[i];
                var b = areas[j];
                Assert.False(a.Start < b.Start + b.Size && b.Start < a.Start + a.Size, $"{a.Name} overlaps {b.Name}");
            }
        }
        var map = E820.Build(MemoryLayout.RamRanges(64UL << 20));
        foreach (var a in areas)
        {
            var type = a.Name == "mptable" ? E820Type.Reserved : E820Type.Ram;
            Assert.Contains(map, e => e.Type == type && a.Start >= e.Address && a.Start + a.Size <= e.End);
            Assert.True(a.Start + a.Size <= LowMemory.HighMemory, a.Name);
        }
        Assert.InRange(LowMemory.StackPointer, LowMemory.StackPage, LowMemory.StackPage + 0x1000 - 16);
        Assert.True(LowMemory.Gdt >= 0x500); // above the real-mode IVT and BIOS data area
    }
}
