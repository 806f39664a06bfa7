namespace KvmSharp.Memory;

/// <summary>The x86-64 guest-physical memory map used by KvmSharp.</summary>
public static class MemoryLayout
{
    public const ulong OneMiB = 1UL << 20;
    public const ulong OneGiB = 1UL << 30;
    public const ulong FourGiB = 4UL << 30;

    /// <summary>Start of the 32-bit MMIO hole: devices (PCI BARs, IOAPIC, LAPIC) live in [3 GiB, 4 GiB).</summary>
    public const ulong MmioHoleStart = 3UL << 30;

    /// <summary>Legacy VGA/BIOS area [640 KiB, 1 MiB) is reserved in e820, though backed by RAM.</summary>
    public const ulong LowMemoryEnd = 0xA0000;

    /// <summary>The largest guest RAM we accept (1 TiB): bounds every size computed from it.</summary>
    public const ulong MaxRamSize = 1UL << 40;

    /// <summary>
    /// Splits <paramref name="ramSize"/> bytes of RAM around the MMIO hole: [0, min(size, 3 GiB)) and,
    /// when larger, the rest from 4 GiB up.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">Size is zero, not page aligned or above 1 TiB.</exception>
    public static IReadOnlyList<(GuestAddress Start, ulong Size)> RamRanges(ulong ramSize)
    {
        if (ramSize == 0 || ramSize % 4096 != 0 || ramSize > MaxRamSize)
            throw new ArgumentOutOfRangeException(nameof(ramSize), $"Guest memory must be a non-zero multiple of 4 KiB up to 1 TiB, not {ramSize} bytes.");
        if (ramSize <= MmioHoleStart)
            return [(new GuestAddress(0), ramSize)];
        return [(new GuestAddress(0), MmioHoleStart), (new GuestAddress(FourGiB), ramSize - MmioHoleStart)];
    }
}
