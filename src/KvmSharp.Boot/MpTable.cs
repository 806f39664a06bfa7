using System.Text;
using KvmSharp.Boot.Acpi;
using KvmSharp.Memory;

namespace KvmSharp.Boot;

/// <summary>
/// Intel MultiProcessor Specification 1.4 tables, so a guest without ACPI finds its CPUs and IOAPIC:
/// the MP floating pointer structure (§4.1) at <see cref="LowMemory.MpTable"/> (the EBDA's first KiB,
/// one of the places Linux's smp_scan_config searches), followed by the configuration table (§4.2):
/// one processor entry per vCPU (local APIC id = vCPU index, BSP flag on 0), one ISA bus, one IOAPIC
/// (id = cpuCount, version 0x11, at <see cref="PlatformLayout.IoApicAddress"/>), 16 I/O interrupt entries mapping ISA IRQ i to IOAPIC
/// pin i (identity, as KVM's default GSI routing and Firecracker's mptable.rs do), and local interrupt
/// entries ExtINT → LINT0 and NMI → LINT1. All of it lies in the e820-reserved [0x9FC00, 1 MiB).
/// </summary>
public static class MpTable
{
    /// <summary>APIC ids 0..253 for CPUs, 254 for the IOAPIC; 255 is the broadcast id.</summary>
    public const int MaxCpus = 254;

    public const byte IoApicVersion = 0x11;
    public const byte LocalApicVersion = 0x14;
    private const int IsaIrqCount = PlatformLayout.IsaIrqCount;

    private const int FloatingPointerSize = 16;
    private const int HeaderSize = 44;
    private const int ProcessorEntrySize = 20;
    private const int SmallEntrySize = 8;

    // Entry types (§4.3).
    internal const byte EntryProcessor = 0, EntryBus = 1, EntryIoApic = 2, EntryIoInterrupt = 3, EntryLocalInterrupt = 4;

    // Interrupt types (Table 4-10).
    internal const byte IntInt = 0, IntNmi = 1, IntExtInt = 3;

    /// <summary>Bytes the tables take for <paramref name="cpuCount"/> CPUs.</summary>
    public static int Size(int cpuCount) =>
        FloatingPointerSize + HeaderSize + cpuCount * ProcessorEntrySize + SmallEntrySize * (2 + IsaIrqCount + 2);

    /// <summary>Writes the floating pointer and configuration table.</summary>
    /// <exception cref="BootException">cpuCount is out of range, or the area is not guest RAM.</exception>
    public static void Write(GuestMemory memory, int cpuCount)
    {
        ArgumentNullException.ThrowIfNull(memory);
        if (cpuCount < 1 || cpuCount > MaxCpus)
            throw new BootException($"CPU count {cpuCount} is out of range for the MP table; 1 to {MaxCpus} are supported.");
        byte[] t = Build(cpuCount);
        if (!memory.TryWrite(new GuestAddress(LowMemory.MpTable), t))
            throw new BootException($"Memory ({memory.TotalSize >> 20} MiB) does not cover the MP table at 0x{LowMemory.MpTable:x}.");
    }

    /// <summary>The tables as bytes, floating pointer first, for placement at <see cref="LowMemory.MpTable"/>.</summary>
    internal static byte[] Build(int cpuCount)
    {
        byte[] t = new byte[Size(cpuCount)];
        const int cfg = FloatingPointerSize;
        uint cfgAddress = (uint)LowMemory.MpTable + cfg;

        // §4.1 floating pointer: "_MP_", physical address of the config table, length in 16-byte
        // units, spec revision 4 (1.4), checksum, feature bytes all 0 (config table present, virtual wire).
        "_MP_"u8.CopyTo(t);
        Le.W32(t, 4, cfgAddress);
        t[8] = 1;
        t[9] = 4;
        t[10] = Checksum(t.AsSpan(0, FloatingPointerSize));

        int p = cfg + HeaderSize;
        byte ioApicId = (byte)cpuCount;
        for (int i = 0; i < cpuCount; i++)
        {
            t[p] = EntryProcessor;
            t[p + 1] = (byte)i;                 // local APIC id
            t[p + 2] = LocalApicVersion;
            t[p + 3] = (byte)(1 | (i == 0 ? 2 : 0)); // EN, BP
            Le.W32(t, p + 4, 0x600);            // CPU signature: family 6
            Le.W32(t, p + 8, 0x201);            // feature flags: FPU, APIC
            p += ProcessorEntrySize;
        }
        t[p] = EntryBus;
        t[p + 1] = 0;
        "ISA   "u8.CopyTo(t.AsSpan(p + 2));
        p += SmallEntrySize;
        t[p] = EntryIoApic;
        t[p + 1] = ioApicId;
        t[p + 2] = IoApicVersion;
        t[p + 3] = 1;                           // EN
        Le.W32(t, p + 4, (uint)PlatformLayout.IoApicAddress);
        p += SmallEntrySize;
        for (int irq = 0; irq < IsaIrqCount; irq++)
        {
            t[p] = EntryIoInterrupt;
            t[p + 1] = IntInt;
            Le.W16(t, p + 2, 0);                // polarity/trigger: conform to the ISA bus
            t[p + 4] = 0;                       // source bus 0 (ISA)
            t[p + 5] = (byte)irq;
            t[p + 6] = ioApicId;
            t[p + 7] = (byte)irq;               // INTIN#
            p += SmallEntrySize;
        }
        // Local interrupts: the 8259's INTR as ExtINT on LINT0 of the BSP, NMI on LINT1 of every CPU.
        WriteLocal(t, p, IntExtInt, destApic: 0, lint: 0);
        p += SmallEntrySize;
        WriteLocal(t, p, IntNmi, destApic: 0xff, lint: 1);
        p += SmallEntrySize;

        // §4.2 configuration table header.
        "PCMP"u8.CopyTo(t.AsSpan(cfg));
        Le.W16(t, cfg + 4, (ushort)(p - cfg));  // base table length
        t[cfg + 6] = 4;                         // spec revision 1.4
        Encoding.ASCII.GetBytes("KVMSHARP").CopyTo(t, cfg + 8);       // OEM id, 8 bytes
        Encoding.ASCII.GetBytes("000000000000").CopyTo(t, cfg + 16);  // product id, 12 bytes
        Le.W16(t, cfg + 34, (ushort)(cpuCount + 2 + IsaIrqCount + 2)); // entry count
        Le.W32(t, cfg + 36, (uint)PlatformLayout.LocalApicAddress);
        t[cfg + 7] = Checksum(t.AsSpan(cfg, p - cfg));
        return t;
    }

    private static void WriteLocal(byte[] t, int p, byte type, byte destApic, byte lint)
    {
        t[p] = EntryLocalInterrupt;
        t[p + 1] = type;
        Le.W16(t, p + 2, 0);
        t[p + 4] = 0;
        t[p + 5] = 0;
        t[p + 6] = destApic;
        t[p + 7] = lint;
    }

    /// <summary>The byte that makes the sum of the (checksum-zeroed) span 0 mod 256.</summary>
    private static byte Checksum(ReadOnlySpan<byte> s)
    {
        byte sum = 0;
        foreach (byte b in s)
            sum += b;
        return (byte)-sum;
    }
}
