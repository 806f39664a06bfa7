namespace KvmSharp.Devices;

/// <summary>
/// The ACPI fixed-hardware power-management registers of a full (not hardware-reduced) ACPI
/// platform (ACPI 6.5 §4.8.3): the PM1a event block (PM1_STS, PM1_EN) and the PM1a control block
/// (PM1_CNT), inserted at the port the FADT names as PM1a_EVT_BLK (the machine layout,
/// KvmSharp.Boot.Acpi.PlatformLayout, says where; PM1a_CNT_BLK is at base + 4).
/// Its job is <c>poweroff</c>: the guest writes SLP_TYP = 5 (the \_S5 value in our DSDT) with
/// SLP_EN, and the device calls <c>powerOff</c>.
/// </summary>
/// <remarks>
/// <para>Register map from the base port: +0 PM1_STS (16 bits, write 1 to clear),
/// +2 PM1_EN (16 bits), +4 PM1_CNT (16 bits), +6 and +7 reserved (read 0). Accesses of any width
/// are applied byte by byte, which is exact here: SLP_TYP (bits 12:10) and SLP_EN (bit 13) share
/// the control register's high byte.</para>
/// <para>PM1_CNT.SCI_EN always reads 1: there is no SMM and no legacy mode, so the FADT has
/// SMI_CMD = 0 and ACPICA finds the system already in ACPI mode. SLP_EN reads 0. No status bit is
/// ever set (no PM timer, no fixed buttons, no wake events), so there is no SCI to raise.</para>
/// <para>Sleep types other than S5 (S1, S3: the DSDT offers none) are ignored and counted in
/// <see cref="IgnoredSleepRequests"/>; the guest then sees the write complete without sleeping,
/// which ACPICA treats as an immediate wake.</para>
/// <para><c>powerOff</c> runs on the writing vCPU thread after the device's lock is released; it
/// should only ask the VMM to stop (exit code 0), and may be called more than once.</para>
/// </remarks>
public sealed class AcpiPm : IBusDevice
{
    /// <summary>Ports to insert the device with.</summary>
    public const int PortCount = 8;

    /// <summary>Register offsets from the base.</summary>
    public const int StatusOffset = 0, EnableOffset = 2, ControlOffset = 4;

    /// <summary>SLP_TYP that means soft off, as \_S5 in the DSDT says.</summary>
    public const int SleepTypeSoftOff = 5;

    // PM1_CNT bits (ACPI 6.5 Table 4.13).
    private const ushort SCI_EN = 1 << 0;
    private const int SLP_TYP_SHIFT = 10;
    private const ushort SLP_TYP_MASK = 7 << SLP_TYP_SHIFT;
    private const ushort SLP_EN = 1 << 13;

    private readonly Action _powerOff;

    // Guards the three registers. Taken alone; the callback runs after release.
    private readonly Lock _lock = new();
    private ushort _status;
    private ushort _enable;
    private ushort _control = SCI_EN;
    private long _ignoredSleepRequests;

    /// <summary>Creates the device.</summary>
    /// <param name="powerOff">Called when the guest enters S5.</param>
    /// <exception cref="ArgumentNullException"><paramref name="powerOff"/> is null.</exception>
    public AcpiPm(Action powerOff)
    {
        ArgumentNullException.ThrowIfNull(powerOff);
        _powerOff = powerOff;
    }

    /// <summary>Sleep requests (SLP_EN set) for a state other than S5.</summary>
    public long IgnoredSleepRequests => Interlocked.Read(ref _ignoredSleepRequests);

    /// <inheritdoc/>
    public void Read(ulong offset, Span<byte> data)
    {
        lock (_lock)
        {
            for (int i = 0; i < data.Length; i++)
                data[i] = ReadByteLocked(offset + (ulong)i);
        }
    }

    /// <inheritdoc/>
    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        bool off = false;
        lock (_lock)
        {
            for (int i = 0; i < data.Length; i++)
                off |= WriteByteLocked(offset + (ulong)i, data[i]);
        }
        if (off)
            _powerOff();
    }

    private byte ReadByteLocked(ulong offset)
    {
        ushort reg = offset switch
        {
            StatusOffset or StatusOffset + 1 => _status,
            EnableOffset or EnableOffset + 1 => _enable,
            ControlOffset or ControlOffset + 1 => (ushort)((_control | SCI_EN) & ~SLP_EN),
            _ => 0,
        };
        return (byte)(reg >> (int)(8 * (offset & 1)));
    }

    /// <returns>True when this byte requested soft off.</returns>
    private bool WriteByteLocked(ulong offset, byte value)
    {
        int shift = (int)(8 * (offset & 1));
        ushort bits = (ushort)(value << shift);
        ushort byteMask = (ushort)(0xFF << shift);
        switch (offset)
        {
            case StatusOffset or StatusOffset + 1:
                _status &= (ushort)~bits; // write 1 to clear
                return false;
            case EnableOffset or EnableOffset + 1:
                _enable = (ushort)((_enable & ~byteMask) | bits);
                return false;
            case ControlOffset or ControlOffset + 1:
                _control = (ushort)(((_control & ~byteMask) | bits) & ~SLP_EN | SCI_EN);
                if ((bits & SLP_EN) == 0)
                    return false;
                if (((_control & SLP_TYP_MASK) >> SLP_TYP_SHIFT) == SleepTypeSoftOff)
                    return true;
                Interlocked.Increment(ref _ignoredSleepRequests);
                return false;
            default:
                return false;
        }
    }
}

/// <summary>
/// The reset control register, conventionally port 0xCF9 (Intel ICH/PCH "RST_CNT"; the FADT's RESET_REG with
/// RESET_VALUE 0x06): a write with RST_CPU (bit 2) set calls <c>reset</c>, whatever SYS_RST
/// (bit 1, hard vs. soft) and FULL_RST (bit 3) say. Linux writes it for ACPI reboot and for
/// <c>reboot=pci</c> (0x02, then 0x06 or 0x0E).
/// </summary>
/// <remarks>
/// <para>Port 0xCF9 lies inside the PCI configuration mechanism #1 ports 0xCF8–0xCFF, which
/// <c>Pci.PciRoot.ConfigIo</c> claims as one range. Without PCI, insert this device at
/// 0xCF9 with length 1. With PCI, insert <see cref="CombineWithPciConfigIo"/> at 0xCF8
/// with length 8 instead of <c>ConfigIo</c>: single-byte accesses to 0xCF9 come here (as on
/// Intel chipsets, where CONFIG_ADDRESS responds only to 32-bit accesses), the rest go to PCI.</para>
/// <para>Reads return the last SYS_RST/FULL_RST bits written; RST_CPU reads 0. <c>reset</c> runs on
/// the writing vCPU thread; it should only ask the VMM to reset or stop, and be idempotent.</para>
/// </remarks>
public sealed class ResetControl : IBusDevice
{
    private const byte SYS_RST = 0x02;
    private const byte RST_CPU = 0x04;
    private const byte FULL_RST = 0x08;

    private readonly Action _reset;
    private int _value;

    /// <summary>Creates the register.</summary>
    /// <param name="reset">Called when the guest writes RST_CPU.</param>
    /// <exception cref="ArgumentNullException"><paramref name="reset"/> is null.</exception>
    public ResetControl(Action reset)
    {
        ArgumentNullException.ThrowIfNull(reset);
        _reset = reset;
    }

    /// <inheritdoc/>
    public void Read(ulong offset, Span<byte> data)
    {
        data.Clear();
        if (offset == 0 && !data.IsEmpty)
            data[0] = (byte)Volatile.Read(ref _value);
    }

    /// <inheritdoc/>
    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        if (offset != 0 || data.IsEmpty)
            return;
        byte v = data[0];
        Volatile.Write(ref _value, v & (SYS_RST | FULL_RST));
        if ((v & RST_CPU) != 0)
            _reset();
    }

    /// <summary>
    /// A device for ports 0xCF8–0xCFF (insert at 0xCF8, length 8) that sends single-byte accesses
    /// at 0xCF9 to this register and every other access to <paramref name="pciConfigIo"/>.
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="pciConfigIo"/> is null.</exception>
    public IBusDevice CombineWithPciConfigIo(IBusDevice pciConfigIo)
    {
        ArgumentNullException.ThrowIfNull(pciConfigIo);
        return new SharedPorts(this, pciConfigIo);
    }

    private sealed class SharedPorts(ResetControl reset, IBusDevice pci) : IBusDevice
    {
        // 0xCF9 − 0xCF8: the byte after CONFIG_ADDRESS's first.
        private const ulong ResetOffset = 1;

        public void Read(ulong offset, Span<byte> data)
        {
            if (offset == ResetOffset && data.Length == 1)
                reset.Read(0, data);
            else
                pci.Read(offset, data);
        }

        public void Write(ulong offset, ReadOnlySpan<byte> data)
        {
            if (offset == ResetOffset && data.Length == 1)
                reset.Write(0, data);
            else
                pci.Write(offset, data);
        }
    }
}
