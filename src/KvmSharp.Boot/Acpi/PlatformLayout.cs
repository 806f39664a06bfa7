using KvmSharp.Memory;

namespace KvmSharp.Boot.Acpi;

/// <summary>
/// The machine layout of the KvmSharp PC platform: every port, ISA IRQ/GSI, MMIO window and fixed
/// address the guest is told about. It is the one source: the VMM's device manager wires devices
/// at these places, and <see cref="AcpiTables"/>, <see cref="MpTable"/> and the virtio-mmio
/// command line describe the same numbers, so what the guest is told and what is wired cannot
/// drift apart. It lives in KvmSharp.Boot because Boot writes the descriptions and must not
/// reference the device models; the device models take their base address from whoever inserts them.
/// </summary>
/// <remarks>
/// <code>
/// ports: 0x60/0x64 i8042 (IRQ 1), 0x70-0x71 CMOS RTC (IRQ 8), 0x80 io_delay (ignored),
///        0xF4 debug exit (opt-in), 0x3F8-0x3FF COM1 (IRQ 4), 0x600-0x607 ACPI PM1a,
///        0xCF8-0xCFF PCI configuration mechanism #1, with the reset register at 0xCF9
/// ISA IRQ n is GSI n (I/O APIC pin n); PCI INTx on GSIs 16-23; MSI routes from GSI 24
/// [0, min(RAM, 3 GiB))                RAM (e820 usable, with the legacy holes below 1 MiB)
/// [0xE0000, 0x100000)                 ACPI tables, in the e820-reserved BIOS area
/// [0xC000_0000, 0xE000_0000)          32-bit PCI BAR window (512 MiB)
/// [0xE000_0000, 0xE010_0000)          PCIe ECAM for bus 0 (MCFG)
/// [0xE100_0000, +4 KiB × 8)           virtio-mmio slots (opt-in transport)
/// [0xFEC0_0000, +4 KiB)               I/O APIC (KVM in-kernel, 24 pins, GSI base 0)
/// [0xFEE0_0000, +4 KiB)               local APICs
/// [0xFFFB_C000, 0xFFFC_0000)          VMX identity map page and real-mode TSS (KVM's, not RAM)
/// [4 GiB, 4 GiB + RAM − 3 GiB)        RAM above the hole, when RAM &gt; 3 GiB
/// [Pci64WindowStart(RAM), +64 GiB)    64-bit PCI BAR window
/// </code>
/// </remarks>
public static class PlatformLayout
{
    /// <summary>COM1, the first 16550A UART: <see cref="Com1PortCount"/> ports from here, on ISA IRQ <see cref="Com1Irq"/>.</summary>
    public const ushort Com1Port = 0x3F8;
    public const byte Com1PortCount = 8;
    public const byte Com1Irq = 4;

    /// <summary>i8042 keyboard controller: data port, status/command port, ISA IRQ (no keyboard is attached).</summary>
    public const ushort I8042DataPort = 0x60;
    public const ushort I8042CommandPort = 0x64;
    public const byte I8042Irq = 1;

    /// <summary>CMOS RTC: index port and data port (<see cref="RtcPortCount"/>), ISA IRQ <see cref="RtcIrq"/>.</summary>
    public const ushort RtcPort = 0x70;
    public const byte RtcPortCount = 2;
    public const byte RtcIrq = 8;

    /// <summary>Linux's io_delay port: writes are accepted and ignored.</summary>
    public const ushort IoDelayPort = 0x80;

    /// <summary>QEMU's isa-debug-exit port (opt-in): a write ends the VM with a status.</summary>
    public const ushort DebugExitPort = 0xF4;

    /// <summary>ISA IRQs 0–15 map identity to GSIs 0–15 (I/O APIC pins), as the MP table and MADT say.</summary>
    public const int IsaIrqCount = 16;

    /// <summary>PCI configuration mechanism #1 (PCI LB 3.0 §3.2.2.3.2): CONFIG_ADDRESS and CONFIG_DATA.</summary>
    public const ushort PciConfigIoPort = 0xCF8;
    public const byte PciConfigIoLength = 8;

    /// <summary>
    /// Intel VMX needs three pages for the real-mode TSS and one for the identity map, outside RAM
    /// and below 4 GiB (api.rst: KVM_SET_TSS_ADDR, KVM_SET_IDENTITY_MAP_ADDR), just below the BIOS
    /// area at the top of the hole.
    /// </summary>
    public const ulong TssAddress = 0xFFFB_D000;
    public const ulong IdentityMapAddress = 0xFFFB_C000;

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

    /// <summary>Bytes per virtio-mmio slot (one device's register window, virtio 1.2 §4.2.2).</summary>
    public const ulong VirtioMmioSlotSize = 0x1000;

    /// <summary>Number of virtio-mmio slots: one per free ISA IRQ in <see cref="VirtioMmioIrqs"/>.</summary>
    public static int VirtioMmioSlotCount => VirtioMmioIrqs.Length;

    /// <summary>Address and ISA IRQ (= GSI) of virtio-mmio slot <paramref name="slot"/>.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="slot"/> is not 0 to <see cref="VirtioMmioSlotCount"/> − 1.</exception>
    public static (ulong Address, byte Irq) VirtioMmioSlot(int slot)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(slot);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(slot, VirtioMmioSlotCount);
        return (VirtioMmioBase + (ulong)slot * VirtioMmioSlotSize, VirtioMmioIrqs[slot]);
    }

    /// <summary>
    /// The kernel command-line word that announces a virtio-mmio device to Linux
    /// (VIRTIO_MMIO_CMDLINE_DEVICES: <c>virtio_mmio.device=size@base:irq</c>), without a leading space.
    /// </summary>
    public static string VirtioMmioCommandLine(int slot)
    {
        var (address, irq) = VirtioMmioSlot(slot);
        return string.Create(System.Globalization.CultureInfo.InvariantCulture, $"virtio_mmio.device={VirtioMmioSlotSize >> 10}K@0x{address:x}:{irq}");
    }

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
