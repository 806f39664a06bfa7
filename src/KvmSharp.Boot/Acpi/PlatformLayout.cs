using KvmSharp.Memory;

namespace KvmSharp.Boot.Acpi;

/// <summary>
/// The guest-physical and port I/O layout of the KvmSharp PC platform, as the ACPI tables describe
/// it. The VMM, the PCI code and <see cref="AcpiTables"/> read these numbers from here so they
/// cannot drift apart.
/// </summary>
/// <remarks>
/// <code>
/// [0, min(RAM, 3 GiB))                RAM (e820 usable, with the legacy holes below 1 MiB)
/// [0xE0000, 0x100000)                 ACPI tables, in the e820-reserved BIOS area
/// [0xC000_0000, 0xE000_0000)          32-bit PCI BAR window (512 MiB)
/// [0xE000_0000, 0xE010_0000)          PCIe ECAM for bus 0 (MCFG)
/// [0xFEC0_0000, +4 KiB)               I/O APIC (KVM in-kernel, 24 pins, GSI base 0)
/// [0xFEE0_0000, +4 KiB)               local APICs
/// [4 GiB, 4 GiB + RAM − 3 GiB)        RAM above the hole, when RAM &gt; 3 GiB
/// [Pci64WindowStart(RAM), +64 GiB)    64-bit PCI BAR window
/// </code>
/// </remarks>
public static class PlatformLayout
{
    /// <summary>Start of the MMIO hole below 4 GiB; RAM stops here (<see cref="MemoryLayout.MmioHoleStart"/>).</summary>
    public const ulong MmioHoleStart = MemoryLayout.MmioHoleStart;

    /// <summary>First byte of the 32-bit PCI memory window.</summary>
    public const ulong Pci32WindowStart = 0xC000_0000;

    /// <summary>Size of the 32-bit PCI memory window: it ends where ECAM begins.</summary>
    public const ulong Pci32WindowSize = 0x2000_0000;

    /// <summary>PCIe enhanced configuration space (PCI Firmware 3.2 §4.1.2, the MCFG table).</summary>
    public const ulong EcamBase = 0xE000_0000;

    /// <summary>Only bus 0 is decoded: 32 devices × 8 functions × 4 KiB.</summary>
    public const ulong EcamSize = 1UL << 20;

    public const byte EcamStartBus = 0;
    public const byte EcamEndBus = 0;

    /// <summary>The I/O APIC (KVM's in-kernel one).</summary>
    public const ulong IoApicAddress = 0xFEC0_0000;

    /// <summary>Redirection entries of KVM's in-kernel I/O APIC (KVM_IOAPIC_NUM_PINS).</summary>
    public const int IoApicPins = 24;

    /// <summary>Every local APIC, at the architectural default.</summary>
    public const ulong LocalApicAddress = 0xFEE0_0000;

    /// <summary>Lowest start of the 64-bit PCI window, and its size.</summary>
    public const ulong Pci64WindowMinStart = 64UL << 30;
    public const ulong Pci64WindowSize = 64UL << 30;
    public const ulong Pci64WindowAlignment = 1UL << 30;

    /// <summary>First GSI used for PCI INTx (I/O APIC pins 16–23); ISA IRQs keep 0–15.</summary>
    public const int PciIntxGsiBase = 16;
    public const int PciIntxGsiCount = 8;

    /// <summary>The ACPI system control interrupt: ISA IRQ 9, level-triggered, on GSI 9.</summary>
    public const int SciIrq = 9;

    /// <summary>
    /// virtio-mmio devices (when chosen instead of virtio-pci): 4 KiB each from here, above ECAM and
    /// outside the PCI window the DSDT hands to the PCI host bridge.
    /// </summary>
    public const ulong VirtioMmioBase = 0xE100_0000;

    /// <summary>
    /// The ISA IRQs virtio-mmio devices use, one each, edge-triggered: those no device of this
    /// platform claims (0 timer, 1 keyboard, 2 cascade, 3/4 UARTs, 8 RTC, 9 SCI stay out). Linux
    /// treats IRQs below 16 as ISA, active-high edge, with or without ACPI.
    /// </summary>
    public static ReadOnlySpan<byte> VirtioMmioIrqs => [5, 6, 7, 10, 11, 12, 14, 15];

    /// <summary>PM1a event block (PM1_STS, PM1_EN: 2 bytes each) and control block (PM1_CNT, 2 bytes), system I/O.</summary>
    public const ushort Pm1aEventBlock = 0x600;
    public const byte Pm1EventLength = 4;
    public const ushort Pm1aControlBlock = 0x604;
    public const byte Pm1ControlLength = 2;

    /// <summary>Ports the PM device (KvmSharp.Devices.AcpiPm) claims from <see cref="Pm1aEventBlock"/>: the two blocks plus 2 reserved bytes.</summary>
    public const byte AcpiPmPortCount = 8;

    /// <summary>Reset control register (Intel ICH "RST_CNT", ACPI FADT RESET_REG) and the value written to reset.</summary>
    public const ushort ResetRegisterPort = 0xCF9;
    public const byte ResetValue = 0x06;

    /// <summary>Sleeping type value for S5 (soft off) in PM1_CNT.SLP_TYP, as \_S5 in the DSDT says.</summary>
    public const int S5SleepType = 5;

    /// <summary>Where the ACPI tables go: the BIOS read-only area, which the e820 map reserves.</summary>
    public const ulong AcpiAreaStart = 0xE0000;
    public const ulong AcpiAreaEnd = 0x100000;

    /// <summary>The RSDP (16-byte aligned, inside the area Linux scans as well).</summary>
    public const ulong RsdpAddress = AcpiAreaStart;

    /// <summary>
    /// Start of the 64-bit PCI window for <paramref name="ramBytes"/> of guest RAM:
    /// max(end of RAM above 4 GiB, 64 GiB), rounded up to 1 GiB.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="ramBytes"/> is above <see cref="MemoryLayout.MaxRamSize"/>.</exception>
    public static ulong Pci64WindowStart(ulong ramBytes)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(ramBytes, MemoryLayout.MaxRamSize);
        ulong highRam = ramBytes > MmioHoleStart ? ramBytes - MmioHoleStart : 0;
        ulong end = MemoryLayout.FourGiB + highRam;
        ulong start = Math.Max(end, Pci64WindowMinStart);
        return (start + Pci64WindowAlignment - 1) & ~(Pci64WindowAlignment - 1);
    }

    /// <summary>
    /// The GSI that INTx pin <paramref name="pin"/> (0 = INTA … 3 = INTD) of PCI device
    /// <paramref name="slot"/> on bus 0 raises: 16 + (slot + pin) mod 8, the classic swizzle over
    /// I/O APIC pins 16–23, as the DSDT's _PRT states. Linux programs these pins level-triggered,
    /// active low; KVM's I/O APIC ignores polarity, so the VMM asserts the GSI (level 1) while
    /// the device's interrupt is pending and deasserts it when it clears (KVM_IRQ_LINE, or an irqfd
    /// with a resample fd).
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">slot is not 0–31 or pin not 0–3.</exception>
    public static int PciIntxGsi(int slot, int pin)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(slot);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(slot, 31);
        ArgumentOutOfRangeException.ThrowIfNegative(pin);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(pin, 3);
        return PciIntxGsiBase + (slot + pin) % PciIntxGsiCount;
    }
}
