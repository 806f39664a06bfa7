using System.Text;
using KvmSharp.Memory;

namespace KvmSharp.Boot.Acpi;

/// <summary>What the ACPI tables describe.</summary>
/// <param name="CpuCount">vCPUs, 1 to <see cref="AcpiTables.MaxCpus"/>; vCPU i has local APIC id i and ACPI processor UID i.</param>
/// <param name="RamBytes">Guest RAM in bytes, laid out as <see cref="MemoryLayout.RamRanges"/> does; places the 64-bit PCI window.</param>
public sealed record AcpiConfig(int CpuCount, ulong RamBytes)
{
    /// <summary>Describe COM1 (PNP0501: <see cref="PlatformLayout.Com1Port"/>, IRQ <see cref="PlatformLayout.Com1Irq"/>) in the DSDT.</summary>
    public bool Com1 { get; init; } = true;

    /// <summary>Describe the i8042 keyboard controller (PNP0303: <see cref="PlatformLayout.I8042DataPort"/>, <see cref="PlatformLayout.I8042CommandPort"/>, IRQ <see cref="PlatformLayout.I8042Irq"/>) in the DSDT.</summary>
    public bool Keyboard { get; init; } = true;

    /// <summary>Describe the CMOS RTC (PNP0B00: <see cref="PlatformLayout.RtcPort"/>, IRQ <see cref="PlatformLayout.RtcIrq"/>) in the DSDT.</summary>
    public bool Rtc { get; init; } = true;
}

/// <summary>One table placed in guest memory.</summary>
/// <param name="Signature">"RSDP", "FACS", "XSDT", "FACP", "APIC", "MCFG" or "DSDT".</param>
public sealed record AcpiTable(string Signature, ulong Address, int Length);

/// <summary>The tables as one image for [<see cref="BaseAddress"/>, + Image.Length).</summary>
public sealed record AcpiTableSet(ulong BaseAddress, byte[] Image, IReadOnlyList<AcpiTable> Tables)
{
    /// <summary>Where the RSDP is: what boot_params.acpi_rsdp_addr / hvm_start_info.rsdp_paddr get.</summary>
    public ulong RsdpAddress => Tables[0].Address;

    /// <summary>The bytes of the table with <paramref name="signature"/>.</summary>
    /// <exception cref="KeyNotFoundException">No such table.</exception>
    public ReadOnlySpan<byte> Get(string signature)
    {
        foreach (var t in Tables)
        {
            if (t.Signature == signature)
                return Image.AsSpan((int)(t.Address - BaseAddress), t.Length);
        }
        throw new KeyNotFoundException($"No ACPI table {signature}.");
    }
}

/// <summary>
/// ACPI 6.5 tables for the KvmSharp PC platform (<see cref="PlatformLayout"/>), so that Linux finds
/// its CPUs, the I/O APIC, the PCIe host bridge and its interrupt routing, and so that
/// <c>poweroff</c> reaches the PM1a control register (<c>KvmSharp.Devices.AcpiPm</c>):
/// RSDP → XSDT → { FADT (→ FACS, DSDT), MADT, MCFG }, all in the BIOS area [0xE0000, 1 MiB) that
/// the e820 map already reserves.
/// </summary>
/// <remarks>
/// <para>The FADT is a full (not hardware-reduced) one: Linux's x86 code expects the legacy PC
/// devices with it. There is no SMM (SMI_CMD = 0: the system is already in ACPI mode), no PM timer
/// (optional since ACPI 5.0A; the TSC/kvmclock is the clock), no GPE blocks and no fixed power or
/// sleep buttons. Reset is RESET_REG = <see cref="PlatformLayout.ResetRegisterPort"/> ← <see cref="PlatformLayout.ResetValue"/>.</para>
/// <para>MADT: the in-kernel I/O APIC has id 0, which is what its ID register reads (QEMU, Cloud
/// Hypervisor and Firecracker use 0 too; I/O APIC and local APIC ids are separate name spaces).
/// ISA IRQs map identity to GSIs 0–15 — there is deliberately <b>no</b> IRQ 0 → GSI 2 override,
/// because KVM's default GSI routing delivers the in-kernel PIT on I/O APIC pin 0 (as the MP table
/// says). The only override is the SCI: IRQ 9 → GSI 9, level-triggered, active high.</para>
/// </remarks>
public static class AcpiTables
{
    /// <summary>xAPIC ids 0–254, minus none for the I/O APIC (id 0 is in its own name space); 255 is broadcast. Matches <see cref="MpTable.MaxCpus"/>.</summary>
    public const int MaxCpus = MpTable.MaxCpus;

    /// <summary>OEMID in every table header and the RSDP.</summary>
    public const string OemId = "KVMSHP";

    /// <summary>OEM Table ID in every table header.</summary>
    public const string OemTableId = "KVMSHARP";

    private const string CreatorId = "KVMS";
    private const int HeaderSize = 36;

    // FADT (ACPI 6.5 §5.2.9, Table 5.9): 276 bytes for revision 6.
    internal const int FadtSize = 276;
    internal const uint FadtFlagWbinvd = 1 << 0;
    internal const uint FadtFlagProcC1 = 1 << 2;
    internal const uint FadtFlagPwrButton = 1 << 4;   // no fixed-feature power button
    internal const uint FadtFlagSlpButton = 1 << 5;   // no fixed-feature sleep button
    internal const uint FadtFlagFixRtc = 1 << 6;      // no RTC wake status in PM1
    internal const uint FadtFlagResetRegSup = 1 << 10;
    internal const ushort BootArchLegacyDevices = 1 << 0, BootArch8042 = 1 << 1, BootArchVgaNotPresent = 1 << 2;
    internal const byte CmosCenturyRegister = 0x32;

    // Generic Address Structure (§5.2.3.2).
    private const byte GasSystemIo = 1;
    private const byte GasAccessByte = 1, GasAccessWord = 2;

    // MADT structure types (§5.2.12).
    internal const byte MadtLocalApic = 0, MadtIoApic = 1, MadtInterruptSourceOverride = 2, MadtLocalApicNmi = 4;
    internal const uint MadtPcatCompat = 1;
    internal const byte IoApicId = 0;
    /// <summary>MPS INTI flags: active high (01), level-triggered (11 &lt;&lt; 2).</summary>
    internal const ushort IntiActiveHighLevel = 0x000D;

    /// <summary>Builds the tables and writes them at <see cref="PlatformLayout.AcpiAreaStart"/>.</summary>
    /// <returns>The RSDP's address (<see cref="PlatformLayout.RsdpAddress"/>).</returns>
    /// <exception cref="BootException">The configuration is out of range, or memory does not cover [0xE0000, 1 MiB).</exception>
    public static ulong Write(GuestMemory memory, AcpiConfig config)
    {
        ArgumentNullException.ThrowIfNull(memory);
        var set = Build(config);
        if (!memory.TryWrite(new GuestAddress(set.BaseAddress), set.Image))
            throw new BootException($"Memory ({memory.TotalSize >> 20} MiB) does not cover the ACPI tables at 0x{set.BaseAddress:x}.");
        return set.RsdpAddress;
    }

    /// <summary>Builds the tables for placement at <see cref="PlatformLayout.AcpiAreaStart"/>.</summary>
    /// <exception cref="BootException">CpuCount or RamBytes is out of range, or the tables outgrow the BIOS area.</exception>
    public static AcpiTableSet Build(AcpiConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        if (config.CpuCount < 1 || config.CpuCount > MaxCpus)
            throw new BootException($"CPU count {config.CpuCount} is out of range for the ACPI tables; 1 to {MaxCpus} are supported.");
        if (config.RamBytes > MemoryLayout.MaxRamSize)
            throw new BootException($"Memory ({config.RamBytes >> 20} MiB) is above the {MemoryLayout.MaxRamSize >> 30} GiB the platform supports.");

        const ulong baseAddress = PlatformLayout.AcpiAreaStart;
        byte[] dsdt = BuildDsdt(config);
        byte[] madt = BuildMadt(config.CpuCount);
        byte[] mcfg = BuildMcfg();
        byte[] facs = BuildFacs();

        // RSDP at the base (16-byte aligned), FACS 64-byte aligned (§5.2.10), the rest 16-byte aligned.
        const int rsdpOff = 0, facsOff = 0x40, xsdtOff = 0x80;
        const int xsdtSize = HeaderSize + 3 * 8;
        int fadtOff = Align(xsdtOff + xsdtSize, 16);
        int madtOff = Align(fadtOff + FadtSize, 16);
        int mcfgOff = Align(madtOff + madt.Length, 16);
        int dsdtOff = Align(mcfgOff + mcfg.Length, 16);
        int end = dsdtOff + dsdt.Length;
        if ((ulong)end > PlatformLayout.AcpiAreaEnd - baseAddress)
            throw new BootException($"The ACPI tables ({end} bytes) do not fit in the BIOS area [0x{baseAddress:x}, 0x{PlatformLayout.AcpiAreaEnd:x}).");

        byte[] fadt = BuildFadt(baseAddress + (ulong)facsOff, baseAddress + (ulong)dsdtOff);
        byte[] xsdt = BuildXsdt([baseAddress + (ulong)fadtOff, baseAddress + (ulong)madtOff, baseAddress + (ulong)mcfgOff]);
        byte[] rsdp = BuildRsdp(baseAddress + xsdtOff);

        byte[] image = new byte[end];
        var tables = new List<AcpiTable>();
        void Place(string sig, byte[] t, int off)
        {
            t.CopyTo(image, off);
            tables.Add(new AcpiTable(sig, baseAddress + (ulong)off, t.Length));
        }
        Place("RSDP", rsdp, rsdpOff);
        Place("FACS", facs, facsOff);
        Place("XSDT", xsdt, xsdtOff);
        Place("FACP", fadt, fadtOff);
        Place("APIC", madt, madtOff);
        Place("MCFG", mcfg, mcfgOff);
        Place("DSDT", dsdt, dsdtOff);
        return new AcpiTableSet(baseAddress, image, tables);
    }

    /// <summary>RSDP, ACPI 2.0+ form (§5.2.5.3): 36 bytes, revision 2, no RSDT, both checksums.</summary>
    internal static byte[] BuildRsdp(ulong xsdtAddress)
    {
        byte[] r = new byte[36];
        "RSD PTR "u8.CopyTo(r);
        Encoding.ASCII.GetBytes(OemId).CopyTo(r, 9);
        r[15] = 2;                       // revision: ACPI 2.0 and later
        Le.W32(r, 16, 0);                // RsdtAddress: none, the XSDT is used
        Le.W32(r, 20, (uint)r.Length);
        Le.W64(r, 24, xsdtAddress);
        r[8] = Checksum(r.AsSpan(0, 20));
        r[32] = Checksum(r);
        return r;
    }

    /// <summary>FACS (§5.2.10): 64 bytes, version 2, no waking vector, global lock free. Has no checksum.</summary>
    internal static byte[] BuildFacs()
    {
        byte[] f = new byte[64];
        "FACS"u8.CopyTo(f);
        Le.W32(f, 4, (uint)f.Length);
        f[32] = 2;                       // version
        return f;
    }

    /// <summary>XSDT (§5.2.8): 64-bit pointers to the other description tables.</summary>
    internal static byte[] BuildXsdt(ReadOnlySpan<ulong> entries)
    {
        byte[] t = new byte[HeaderSize + 8 * entries.Length];
        for (int i = 0; i < entries.Length; i++)
            Le.W64(t, HeaderSize + 8 * i, entries[i]);
        return Finish(t, "XSDT", 1);
    }

    /// <summary>FADT revision 6 (§5.2.9): PM1a blocks, SCI, reset register, boot architecture flags.</summary>
    internal static byte[] BuildFadt(ulong facsAddress, ulong dsdtAddress)
    {
        byte[] f = new byte[FadtSize];
        Le.W32(f, 36, (uint)facsAddress);              // FIRMWARE_CTRL (below 4 GiB; X_FIRMWARE_CTRL stays 0)
        Le.W32(f, 40, (uint)dsdtAddress);              // DSDT (X_DSDT holds the same address)
        f[45] = 0;                                     // Preferred_PM_Profile: unspecified
        Le.W16(f, 46, PlatformLayout.SciIrq);          // SCI_INT
        Le.W32(f, 48, 0);                              // SMI_CMD: none, ACPI mode is always on
        Le.W32(f, 56, PlatformLayout.Pm1aEventBlock);  // PM1a_EVT_BLK
        Le.W32(f, 64, PlatformLayout.Pm1aControlBlock); // PM1a_CNT_BLK
        f[88] = PlatformLayout.Pm1EventLength;         // PM1_EVT_LEN
        f[89] = PlatformLayout.Pm1ControlLength;       // PM1_CNT_LEN
        f[91] = 0;                                     // PM_TMR_LEN: no PM timer
        Le.W16(f, 96, 0x0FFF);                         // P_LVL2_LAT > 100: C2 not supported
        Le.W16(f, 98, 0x0FFF);                         // P_LVL3_LAT > 1000: C3 not supported
        f[108] = CmosCenturyRegister;                  // CENTURY
        Le.W16(f, 109, BootArchLegacyDevices | BootArch8042 | BootArchVgaNotPresent); // IAPC_BOOT_ARCH
        Le.W32(f, 112, FadtFlagWbinvd | FadtFlagProcC1 | FadtFlagPwrButton | FadtFlagSlpButton | FadtFlagFixRtc | FadtFlagResetRegSup);
        WriteGas(f, 116, GasSystemIo, 8, GasAccessByte, PlatformLayout.ResetRegisterPort); // RESET_REG
        f[128] = PlatformLayout.ResetValue;            // RESET_VALUE
        f[131] = 5;                                    // FADT minor version: ACPI 6.5
        Le.W64(f, 132, 0);                             // X_FIRMWARE_CTRL
        Le.W64(f, 140, dsdtAddress);                   // X_DSDT
        WriteGas(f, 148, GasSystemIo, PlatformLayout.Pm1EventLength * 8, GasAccessWord, PlatformLayout.Pm1aEventBlock);     // X_PM1a_EVT_BLK
        WriteGas(f, 172, GasSystemIo, PlatformLayout.Pm1ControlLength * 8, GasAccessWord, PlatformLayout.Pm1aControlBlock); // X_PM1a_CNT_BLK
        "KVMSHARP"u8.CopyTo(f.AsSpan(268));            // Hypervisor Vendor Identity
        return Finish(f, "FACP", 6);
    }

    /// <summary>
    /// MADT (§5.2.12): local APIC address, PCAT_COMPAT, one Processor Local APIC structure per vCPU
    /// (UID = APIC id = index, enabled), the I/O APIC, the SCI interrupt source override and a
    /// local APIC NMI on LINT1 of every processor.
    /// </summary>
    internal static byte[] BuildMadt(int cpuCount)
    {
        var b = new List<byte>();
        for (int i = 0; i < cpuCount; i++)
        {
            b.AddRange([MadtLocalApic, 8, (byte)i, (byte)i]); // type, length, ACPI processor UID, APIC id
            AddLe32(b, 1);                                    // flags: enabled
        }
        b.AddRange([MadtIoApic, 12, IoApicId, 0]);
        AddLe32(b, (uint)PlatformLayout.IoApicAddress);
        AddLe32(b, 0);                                        // global system interrupt base
        b.AddRange([MadtInterruptSourceOverride, 10, 0, PlatformLayout.SciIrq]); // bus 0 (ISA), source IRQ
        AddLe32(b, PlatformLayout.SciIrq);                    // GSI
        b.AddRange([(byte)IntiActiveHighLevel, IntiActiveHighLevel >> 8]);
        b.AddRange([MadtLocalApicNmi, 6, 0xFF, 0, 0, 1]);     // all processors, flags 0 (conforming), LINT1

        byte[] t = new byte[HeaderSize + 8 + b.Count];
        Le.W32(t, 36, (uint)PlatformLayout.LocalApicAddress);
        Le.W32(t, 40, MadtPcatCompat);
        b.CopyTo(t, HeaderSize + 8);
        return Finish(t, "APIC", 5);
    }

    /// <summary>MCFG (PCI Firmware 3.2 §4.1.2): one ECAM allocation, segment 0, buses 0–0.</summary>
    internal static byte[] BuildMcfg()
    {
        byte[] t = new byte[HeaderSize + 8 + 16];
        int o = HeaderSize + 8;                        // 8 reserved bytes
        Le.W64(t, o, PlatformLayout.EcamBase);
        Le.W16(t, o + 8, 0);                           // PCI segment group
        t[o + 10] = PlatformLayout.EcamStartBus;
        t[o + 11] = PlatformLayout.EcamEndBus;
        return Finish(t, "MCFG", 1);
    }

    /// <summary>The DSDT: header (revision 2: 64-bit integers) plus <see cref="BuildDsdtAml"/>.</summary>
    internal static byte[] BuildDsdt(AcpiConfig config)
    {
        byte[] aml = BuildDsdtAml(config);
        byte[] t = new byte[HeaderSize + aml.Length];
        aml.CopyTo(t, HeaderSize);
        return Finish(t, "DSDT", 2);
    }

    /// <summary>
    /// The DSDT's AML:
    /// <code>
    /// Name (\_S5, Package () { 5, 5, 0, 0 })
    /// Scope (\_SB) {
    ///   Device (PCI0) { _HID PNP0A08, _CID PNP0A03, _SEG 0, _BBN 0, _UID 0, _CRS, _PRT }
    ///   Device (MBRD) { _HID PNP0C02: ECAM and the ACPI PM ports }
    ///   Device (COM1), Device (KBD_), Device (RTC_)   (each optional)
    ///   Device (C000) … { _HID "ACPI0007", _UID n }   (one per vCPU)
    /// }
    /// </code>
    /// </summary>
    internal static byte[] BuildDsdtAml(AcpiConfig config)
    {
        var a = new AmlBuilder();
        // \_S5: SLP_TYPa, SLP_TYPb, reserved, reserved (ACPI 6.5 §7.4.2).
        a.Name("_S5").BeginPackage() // in the root scope, where the DSDT is loaded
            .Integer(PlatformLayout.S5SleepType).Integer(PlatformLayout.S5SleepType).Integer(0).Integer(0)
            .End();

        a.BeginScope("_SB"); // \\_SB: relative to the root scope, as iasl writes it

        a.BeginDevice("PCI0");
        a.Name("_HID").EisaId("PNP0A08");
        a.Name("_CID").EisaId("PNP0A03");
        a.Name("_SEG").Integer(0);
        a.Name("_BBN").Integer(0);
        a.Name("_UID").Integer(0);
        ulong w64 = PlatformLayout.Pci64WindowStart(config.RamBytes);
        var crs = new ResourceTemplate()
            .WordBusNumber(PlatformLayout.EcamStartBus, PlatformLayout.EcamEndBus)
            .Io(PlatformLayout.PciConfigIoPort, PlatformLayout.PciConfigIoPort, 1, PlatformLayout.PciConfigIoLength)                  // configuration mechanism #1 ports, consumed by the bridge
            .WordIo(0x0000, PlatformLayout.PciConfigIoPort - 1)
            .WordIo(PlatformLayout.PciConfigIoPort + PlatformLayout.PciConfigIoLength, 0xFFFF)
            .DWordMemory((uint)PlatformLayout.Pci32WindowStart, (uint)(PlatformLayout.Pci32WindowStart + PlatformLayout.Pci32WindowSize - 1), cacheable: false)
            .QWordMemory(w64, w64 + PlatformLayout.Pci64WindowSize - 1, cacheable: true);
        a.Name("_CRS").Buffer(crs.ToArray());
        // _PRT (§6.2.13): static GSIs (Source = 0), Address = slot << 16 | 0xFFFF (any function).
        a.Name("_PRT").BeginPackage();
        for (int slot = 0; slot < 32; slot++)
        {
            for (int pin = 0; pin < 4; pin++)
            {
                a.BeginPackage()
                    .Integer(((ulong)slot << 16) | 0xFFFF).Integer((ulong)pin).Integer(0)
                    .Integer((ulong)PlatformLayout.PciIntxGsi(slot, pin))
                    .End();
            }
        }
        a.End();
        a.End(); // PCI0

        // Motherboard resources: Linux accepts the MCFG region only if a PNP0C01/PNP0C02 device
        // reserves it (arch/x86/pci/mmconfig-shared.c, is_acpi_reserved); the PM ports are listed so
        // nothing is allocated over them.
        a.BeginDevice("MBRD");
        a.Name("_HID").EisaId("PNP0C02");
        a.Name("_UID").Integer(0);
        a.Name("_CRS").Buffer(new ResourceTemplate()
            .Memory32Fixed((uint)PlatformLayout.EcamBase, (uint)PlatformLayout.EcamSize)
            .Io(PlatformLayout.Pm1aEventBlock, PlatformLayout.Pm1aEventBlock, 1, PlatformLayout.AcpiPmPortCount)
            .ToArray());
        a.End();

        if (config.Com1)
        {
            a.BeginDevice("COM1");
            a.Name("_HID").EisaId("PNP0501");
            a.Name("_UID").Integer(1);
            a.Name("_CRS").Buffer(Com1Resources().ToArray());
            a.End();
        }
        if (config.Keyboard)
        {
            a.BeginDevice("KBD");
            a.Name("_HID").EisaId("PNP0303");
            a.Name("_CRS").Buffer(KeyboardResources().ToArray());
            a.End();
        }
        if (config.Rtc)
        {
            a.BeginDevice("RTC");
            a.Name("_HID").EisaId("PNP0B00");
            a.Name("_CRS").Buffer(RtcResources().ToArray());
            a.End();
        }

        // Processor devices (§8.4): Linux's processor driver binds them to the MADT entries by _UID.
        for (int i = 0; i < config.CpuCount; i++)
        {
            a.BeginDevice(ProcessorName(i));
            a.Name("_HID").String("ACPI0007");
            a.Name("_UID").Integer((ulong)i);
            a.End();
        }

        a.End(); // \_SB
        return a.ToArray();
    }

    /// <summary>COM1's _CRS (PNP0501).</summary>
    internal static ResourceTemplate Com1Resources() => new ResourceTemplate()
        .Io(PlatformLayout.Com1Port, PlatformLayout.Com1Port, 1, PlatformLayout.Com1PortCount).IrqNoFlags(PlatformLayout.Com1Irq);

    /// <summary>The i8042's _CRS (PNP0303).</summary>
    internal static ResourceTemplate KeyboardResources() => new ResourceTemplate()
        .Io(PlatformLayout.I8042DataPort, PlatformLayout.I8042DataPort, 1, 1)
        .Io(PlatformLayout.I8042CommandPort, PlatformLayout.I8042CommandPort, 1, 1)
        .IrqNoFlags(PlatformLayout.I8042Irq);

    /// <summary>The CMOS RTC's _CRS (PNP0B00).</summary>
    internal static ResourceTemplate RtcResources() => new ResourceTemplate()
        .Io(PlatformLayout.RtcPort, PlatformLayout.RtcPort, 1, PlatformLayout.RtcPortCount).IrqNoFlags(PlatformLayout.RtcIrq);

    /// <summary>"C000" … "C0FD": the DSDT name of vCPU <paramref name="index"/>'s processor device.</summary>
    internal static string ProcessorName(int index) => "C" + index.ToString("X3", System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>Fills the 36-byte header (§5.2.6) of <paramref name="t"/> and its checksum.</summary>
    private static byte[] Finish(byte[] t, string signature, byte revision)
    {
        Encoding.ASCII.GetBytes(signature).CopyTo(t, 0);
        Le.W32(t, 4, (uint)t.Length);
        t[8] = revision;
        Encoding.ASCII.GetBytes(OemId).CopyTo(t, 10);
        Encoding.ASCII.GetBytes(OemTableId).CopyTo(t, 16);
        Le.W32(t, 24, 1);                              // OEM revision
        Encoding.ASCII.GetBytes(CreatorId).CopyTo(t, 28);
        Le.W32(t, 32, 1);                              // creator revision
        t[9] = 0;
        t[9] = Checksum(t);
        return t;
    }

    private static void WriteGas(byte[] f, int o, byte space, int bitWidth, byte accessSize, ulong address)
    {
        f[o] = space;
        f[o + 1] = (byte)bitWidth;
        f[o + 2] = 0;                                  // bit offset
        f[o + 3] = accessSize;
        Le.W64(f, o + 4, address);
    }

    private static void AddLe32(List<byte> b, uint v)
    {
        for (int i = 0; i < 4; i++)
            b.Add((byte)(v >> (8 * i)));
    }

    private static int Align(int v, int a) => (v + a - 1) & ~(a - 1);

    /// <summary>The byte that makes the span (with this byte's slot at 0) sum to 0 mod 256.</summary>
    internal static byte Checksum(ReadOnlySpan<byte> s)
    {
        byte sum = 0;
        foreach (byte x in s)
            sum += x;
        return (byte)-sum;
    }
}
