namespace KvmSharp.Devices;

/// <summary>Standard PC port I/O addresses and ISA IRQs of the legacy devices in this assembly.</summary>
public static class PcPorts
{
    /// <summary>COM1, the first 16550A UART: 8 ports from here.</summary>
    public const ushort Com1 = 0x3F8;

    /// <summary>ISA IRQ of COM1 (and COM3).</summary>
    public const int Com1Irq = 4;

    /// <summary>COM2: 8 ports from here.</summary>
    public const ushort Com2 = 0x2F8;

    /// <summary>ISA IRQ of COM2 (and COM4).</summary>
    public const int Com2Irq = 3;

    /// <summary>i8042 data port.</summary>
    public const ushort I8042Data = 0x60;

    /// <summary>i8042 status (read) and command (write) port.</summary>
    public const ushort I8042Command = 0x64;

    /// <summary>System Control Port B.</summary>
    public const ushort PortB = 0x61;

    /// <summary>CMOS RTC index port; the data port follows at 0x71 (<see cref="CmosRtc"/> takes 2 ports).</summary>
    public const ushort Rtc = 0x70;

    /// <summary>ISA IRQ of the CMOS RTC.</summary>
    public const int RtcIrq = 8;

    /// <summary>QEMU-style debug exit port.</summary>
    public const ushort DebugExit = 0xF4;
}
