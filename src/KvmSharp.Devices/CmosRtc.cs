namespace KvmSharp.Devices;

/// <summary>
/// The PC CMOS real-time clock and NVRAM (Motorola MC146818A datasheet; register names from it):
/// index port 0x70 (offset 0), data port 0x71 (offset 1). The time comes from a host clock plus
/// an offset the guest sets by writing the time registers; the NVRAM carries the memory-size
/// bytes PC firmware (SeaBIOS) reads.
/// </summary>
/// <remarks>
/// <para><b>Index.</b> Bit 7 of the value written to 0x70 is the NMI mask on PCs and is ignored;
/// bits 0-6 select one of 128 bytes. Port 0x70 is write-only and reads 0xFF.</para>
/// <para><b>Time registers</b> (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week,
/// 0x07 date, 0x08 month, 0x09 year, 0x32 century) are computed on each read from
/// <c>clock() + offset</c>, in BCD unless register B's DM bit selects binary, and in 12-hour form
/// with bit 7 = PM unless register B's 24/12 bit is set. While register B's SET bit is set the
/// time is frozen and writes go to a latch; clearing SET loads the latched time (MC146818A,
/// register B bit 7), which sets the offset. A time write with SET clear takes effect at once.
/// The guest's clock thus persists for the life of the device.</para>
/// <para><b>Register A</b> reads as written (divider, rate) except UIP (bit 7), which is set only
/// during the 244 µs before each second's update, the datasheet's guarantee that a guest that
/// read UIP = 0 can read all time registers before they change. It is never stuck.</para>
/// <para><b>Register C</b> reports UF (update ended) when a second boundary passed since it was
/// last read, and IRQF when UIE also enables it; reading C clears it. AF and PF are never set
/// and no interrupt is raised: this model has no IRQ 8 line yet. <b>Register D</b> reads VRT
/// (valid RAM and time) = 1.</para>
/// <para><b>Memory bytes</b>, as QEMU's pc_cmos_init stores them for SeaBIOS: 0x15-0x16 base
/// memory in KiB (at most 640), 0x17-0x18 and 0x30-0x31 extended memory above 1 MiB in KiB
/// (at most 65535), 0x34-0x35 memory between 16 MiB and 4 GiB in 64 KiB units (at most 65535),
/// 0x5B-0x5D memory above 4 GiB in 64 KiB units; 0x2E-0x2F hold the checksum of 0x10-0x2D.</para>
/// </remarks>
public sealed class CmosRtc : IBusDevice
{
    /// <summary>Number of ports the device occupies: index and data.</summary>
    public const int PortCount = 2;

    private const int IndexPort = 0;
    private const int DataPort = 1;

    private const int NvramSize = 128;
    private const byte INDEX_MASK = 0x7F; // bit 7: PC NMI mask, not part of the index

    // Clock and control registers (MC146818A, "Address map").
    private const int REG_SECONDS = 0x00;
    private const int REG_SECONDS_ALARM = 0x01;
    private const int REG_MINUTES = 0x02;
    private const int REG_MINUTES_ALARM = 0x03;
    private const int REG_HOURS = 0x04;
    private const int REG_HOURS_ALARM = 0x05;
    private const int REG_DAY_OF_WEEK = 0x06;
    private const int REG_DAY_OF_MONTH = 0x07;
    private const int REG_MONTH = 0x08;
    private const int REG_YEAR = 0x09;
    private const int REG_A = 0x0A;
    private const int REG_B = 0x0B;
    private const int REG_C = 0x0C;
    private const int REG_D = 0x0D;
    private const int REG_CENTURY = 0x32; // IBM PC convention (ACPI FADT "CENTURY" points here)

    // Register A.
    private const byte REG_A_UIP = 0x80;
    private const byte REG_A_DEFAULT = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate

    // Register B.
    private const byte REG_B_SET = 0x80;
    private const byte REG_B_UIE = 0x10;
    private const byte REG_B_DM = 0x04;     // 1 = binary, 0 = BCD
    private const byte REG_B_24H = 0x02;    // 1 = 24-hour mode
    private const byte REG_B_DEFAULT = REG_B_24H;

    // Register C.
    private const byte REG_C_IRQF = 0x80;
    private const byte REG_C_UF = 0x10;

    // Register D.
    private const byte REG_D_VRT = 0x80;

    private const byte HOURS_PM = 0x80;

    // 244 µs: UIP rises this long before the update cycle (MC146818A, "Update cycle").
    private static readonly long UipWindowTicks = TimeSpan.FromMicroseconds(244).Ticks;

    // NVRAM layout for PC firmware (QEMU hw/i386/pc.c pc_cmos_init; SeaBIOS src/fw/paravirt.c).
    private const int CMOS_BASE_MEM_LOW = 0x15;
    private const int CMOS_EXT_MEM_LOW = 0x17;
    private const int CMOS_CHECKSUM_HIGH = 0x2E;
    private const int CMOS_EXT_MEM_COPY_LOW = 0x30;
    private const int CMOS_MEM_ABOVE_16M_LOW = 0x34;
    private const int CMOS_MEM_ABOVE_4G_LOW = 0x5B;
    private const int CMOS_CHECKSUM_FIRST = 0x10;
    private const int CMOS_CHECKSUM_LAST = 0x2D;

    private const ulong KiB = 1024;
    private const ulong MiB = 1024 * KiB;

    private readonly Func<DateTime> _clock;

    // Guards every field below. Lock order: taken alone; the clock callback is called under it.
    private readonly Lock _lock = new();
    private readonly byte[] _nvram = new byte[NvramSize];
    private int _index;
    private TimeSpan _offset;          // guest time minus host time
    private bool _latched;             // register B SET: time frozen in the latch below
    private int _second, _minute, _hour, _day, _month, _year; // the latch (full year)
    private long _lastCReadSecond;     // guest time in whole seconds when C was last read

    /// <summary>Creates the RTC and fills the memory-size bytes.</summary>
    /// <param name="clock">Returns the host's current UTC time; called on every time read.</param>
    /// <param name="memoryBelow4G">Bytes of guest RAM below 4 GiB.</param>
    /// <param name="memoryAbove4G">Bytes of guest RAM at and above 4 GiB.</param>
    /// <exception cref="ArgumentNullException"><paramref name="clock"/> is null.</exception>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="memoryBelow4G"/> exceeds 4 GiB.</exception>
    public CmosRtc(Func<DateTime> clock, ulong memoryBelow4G, ulong memoryAbove4G)
    {
        ArgumentNullException.ThrowIfNull(clock);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(memoryBelow4G, 4096 * MiB);
        _clock = clock;
        _nvram[REG_A] = REG_A_DEFAULT;
        _nvram[REG_B] = REG_B_DEFAULT;
        _nvram[REG_D] = REG_D_VRT;

        ulong baseKiB = Math.Min(memoryBelow4G / KiB, 640);
        SetWord(CMOS_BASE_MEM_LOW, (uint)baseKiB);
        ulong extendedKiB = memoryBelow4G > MiB ? Math.Min((memoryBelow4G - MiB) / KiB, 0xFFFF) : 0;
        SetWord(CMOS_EXT_MEM_LOW, (uint)extendedKiB);
        SetWord(CMOS_EXT_MEM_COPY_LOW, (uint)extendedKiB);
        ulong above16M = memoryBelow4G > 16 * MiB ? Math.Min((memoryBelow4G - 16 * MiB) / (64 * KiB), 0xFFFF) : 0;
        SetWord(CMOS_MEM_ABOVE_16M_LOW, (uint)above16M);
        ulong above4G = Math.Min(memoryAbove4G / (64 * KiB), 0xFF_FFFF);
        _nvram[CMOS_MEM_ABOVE_4G_LOW] = (byte)above4G;
        _nvram[CMOS_MEM_ABOVE_4G_LOW + 1] = (byte)(above4G >> 8);
        _nvram[CMOS_MEM_ABOVE_4G_LOW + 2] = (byte)(above4G >> 16);
        UpdateChecksum();

        _lastCReadSecond = GuestNowLocked().Ticks / TimeSpan.TicksPerSecond;
    }

    /// <inheritdoc/>
    /// <remarks>A wider access is handled byte by byte at consecutive ports.</remarks>
    public void Read(ulong offset, Span<byte> data)
    {
        lock (_lock)
        {
            for (int i = 0; i < data.Length; i++)
                data[i] = (offset + (ulong)i) == DataPort ? ReadDataLocked() : (byte)0xFF;
        }
    }

    /// <inheritdoc/>
    /// <remarks>A wider access is handled byte by byte at consecutive ports.</remarks>
    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        lock (_lock)
        {
            for (int i = 0; i < data.Length; i++)
            {
                switch (offset + (ulong)i)
                {
                    case IndexPort:
                        _index = data[i] & INDEX_MASK;
                        break;
                    case DataPort:
                        WriteDataLocked(data[i]);
                        break;
                }
            }
        }
    }

    private bool BinaryLocked => (_nvram[REG_B] & REG_B_DM) != 0;
    private bool Hours24Locked => (_nvram[REG_B] & REG_B_24H) != 0;

    private DateTime GuestNowLocked()
    {
        // Saturate: a guest that set year 9999 must not make DateTime arithmetic throw later.
        long ticks = _clock().Ticks + _offset.Ticks;
        return new DateTime(Math.Clamp(ticks, 0, DateTime.MaxValue.Ticks), DateTimeKind.Utc);
    }

    private byte ReadDataLocked()
    {
        switch (_index)
        {
            case REG_SECONDS:
            case REG_MINUTES:
            case REG_HOURS:
            case REG_DAY_OF_WEEK:
            case REG_DAY_OF_MONTH:
            case REG_MONTH:
            case REG_YEAR:
            case REG_CENTURY:
            {
                if (!_latched)
                    LatchLocked(GuestNowLocked());
                return EncodeTimeRegisterLocked(_index);
            }
            case REG_A:
            {
                byte a = (byte)(_nvram[REG_A] & ~REG_A_UIP);
                if (!_latched)
                {
                    long ticksIntoSecond = GuestNowLocked().Ticks % TimeSpan.TicksPerSecond;
                    if (ticksIntoSecond >= TimeSpan.TicksPerSecond - UipWindowTicks)
                        a |= REG_A_UIP;
                }
                return a;
            }
            case REG_C:
            {
                byte c = 0;
                if (!_latched)
                {
                    long second = GuestNowLocked().Ticks / TimeSpan.TicksPerSecond;
                    if (second != _lastCReadSecond)
                    {
                        c |= REG_C_UF;
                        if ((_nvram[REG_B] & REG_B_UIE) != 0)
                            c |= REG_C_IRQF;
                    }
                    _lastCReadSecond = second;
                }
                return c; // reading C clears it
            }
            case REG_D:
                return REG_D_VRT;
            default:
                return _nvram[_index];
        }
    }

    private void WriteDataLocked(byte value)
    {
        switch (_index)
        {
            case REG_SECONDS:
            case REG_MINUTES:
            case REG_HOURS:
            case REG_DAY_OF_MONTH:
            case REG_MONTH:
            case REG_YEAR:
            case REG_CENTURY:
            {
                bool immediate = !_latched;
                if (immediate)
                    LatchLocked(GuestNowLocked());
                DecodeTimeRegisterLocked(_index, value);
                if (immediate)
                    CommitLatchLocked();
                break;
            }
            case REG_DAY_OF_WEEK:
                break; // derived from the date
            case REG_A:
                _nvram[REG_A] = (byte)(value & ~REG_A_UIP); // UIP is read-only
                break;
            case REG_B:
            {
                bool set = (value & REG_B_SET) != 0;
                if (set)
                    value = (byte)(value & ~REG_B_UIE); // setting SET clears UIE (MC146818A, register B)
                if (set && !_latched)
                {
                    LatchLocked(GuestNowLocked());
                    _latched = true;
                }
                else if (!set && _latched)
                {
                    _latched = false;
                    CommitLatchLocked();
                }
                _nvram[REG_B] = value;
                break;
            }
            case REG_C:
            case REG_D:
                break; // read-only
            default:
                // Alarms and NVRAM. The memory-size bytes are writable, as on hardware.
                _nvram[_index] = value;
                break;
        }
    }

    private void LatchLocked(DateTime time)
    {
        _second = time.Second;
        _minute = time.Minute;
        _hour = time.Hour;
        _day = time.Day;
        _month = time.Month;
        _year = time.Year;
    }

    /// <summary>Makes the latched time the guest's current time.</summary>
    private void CommitLatchLocked()
    {
        _offset = LatchedTimeLocked() - _clock();
    }

    /// <summary>The latch as a time, with out-of-range fields clamped.</summary>
    private DateTime LatchedTimeLocked()
    {
        // A guest may write fields in any order, passing through dates like February 31, or
        // write non-BCD garbage; the datasheet leaves such values undefined. Clamp instead of
        // throwing on a vCPU thread.
        int year = Math.Clamp(_year, 1, 9999);
        int month = Math.Clamp(_month, 1, 12);
        int day = Math.Clamp(_day, 1, DateTime.DaysInMonth(year, month));
        return new DateTime(year, month, day,
            Math.Clamp(_hour, 0, 23), Math.Clamp(_minute, 0, 59), Math.Clamp(_second, 0, 59),
            DateTimeKind.Utc);
    }

    private byte EncodeTimeRegisterLocked(int register)
    {
        switch (register)
        {
            case REG_SECONDS: return EncodeLocked(_second);
            case REG_MINUTES: return EncodeLocked(_minute);
            case REG_HOURS:
                if (Hours24Locked)
                    return EncodeLocked(_hour);
                int hour12 = _hour % 12 == 0 ? 12 : _hour % 12;
                return (byte)(EncodeLocked(hour12) | (_hour >= 12 ? HOURS_PM : 0));
            case REG_DAY_OF_WEEK:
                return EncodeLocked((int)LatchedTimeLocked().DayOfWeek + 1); // 1 = Sunday (PC convention)
            case REG_DAY_OF_MONTH: return EncodeLocked(_day);
            case REG_MONTH: return EncodeLocked(_month);
            case REG_YEAR: return EncodeLocked(_year % 100);
            case REG_CENTURY: return EncodeLocked(_year / 100);
            default: return 0;
        }
    }

    private void DecodeTimeRegisterLocked(int register, byte value)
    {
        switch (register)
        {
            case REG_SECONDS: _second = DecodeLocked(value); break;
            case REG_MINUTES: _minute = DecodeLocked(value); break;
            case REG_HOURS:
                if (Hours24Locked)
                {
                    _hour = DecodeLocked(value);
                }
                else
                {
                    int hour12 = DecodeLocked((byte)(value & ~HOURS_PM));
                    _hour = hour12 % 12 + ((value & HOURS_PM) != 0 ? 12 : 0);
                }
                break;
            case REG_DAY_OF_MONTH: _day = DecodeLocked(value); break;
            case REG_MONTH: _month = DecodeLocked(value); break;
            case REG_YEAR: _year = _year / 100 * 100 + DecodeLocked(value) % 100; break;
            case REG_CENTURY: _year = DecodeLocked(value) * 100 + _year % 100; break;
        }
    }

    private byte EncodeLocked(int value) => BinaryLocked ? (byte)value : ToBcd(value);

    private int DecodeLocked(byte value) => BinaryLocked ? value : FromBcd(value);

    private static byte ToBcd(int value) => (byte)((value / 10 % 10) << 4 | (value % 10));

    private static int FromBcd(byte value) => (value >> 4) * 10 + (value & 0x0F);

    private void SetWord(int lowIndex, uint value)
    {
        _nvram[lowIndex] = (byte)value;
        _nvram[lowIndex + 1] = (byte)(value >> 8);
    }

    private void UpdateChecksum()
    {
        int sum = 0;
        for (int i = CMOS_CHECKSUM_FIRST; i <= CMOS_CHECKSUM_LAST; i++)
            sum += _nvram[i];
        _nvram[CMOS_CHECKSUM_HIGH] = (byte)(sum >> 8);
        _nvram[CMOS_CHECKSUM_HIGH + 1] = (byte)sum;
    }
}
