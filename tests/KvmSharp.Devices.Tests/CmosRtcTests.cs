namespace KvmSharp.Devices.Tests;

public class CmosRtcTests
{
    private const byte RTC_SECONDS = 0x00, RTC_MINUTES = 0x02, RTC_HOURS = 0x04, RTC_DAY_OF_WEEK = 0x06,
        RTC_DAY_OF_MONTH = 0x07, RTC_MONTH = 0x08, RTC_YEAR = 0x09, RTC_REG_A = 0x0A, RTC_REG_B = 0x0B,
        RTC_REG_C = 0x0C, RTC_REG_D = 0x0D, RTC_CENTURY = 0x32;
    private const byte RTC_UIP = 0x80, RTC_SET = 0x80, RTC_UIE = 0x10, RTC_DM_BINARY = 0x04, RTC_24H = 0x02;

    private const ulong MiB = 1024 * 1024, GiB = 1024 * MiB;

    // Thursday.
    private static readonly DateTime Start = new(2026, 11, 26, 13, 45, 7, 500, DateTimeKind.Utc);

    private sealed class Rtc
    {
        public DateTime Now = Start;
        public readonly CmosRtc Device;

        public Rtc(ulong below4G = 512 * MiB, ulong above4G = 0) =>
            Device = new CmosRtc(() => Now, below4G, above4G);

        public byte Get(byte index)
        {
            Device.Write(0, [index]);
            Span<byte> b = stackalloc byte[1];
            Device.Read(1, b);
            return b[0];
        }

        public void Set(byte index, byte value)
        {
            Device.Write(0, [index]);
            Device.Write(1, [value]);
        }
    }

    [Fact]
    public void ResetState_24HourBcd_WithSaneControlRegisters()
    {
        var r = new Rtc();
        Assert.Equal(0x26, r.Get(RTC_REG_A));
        Assert.Equal(RTC_24H, r.Get(RTC_REG_B));
        Assert.Equal(0x80, r.Get(RTC_REG_D));
    }

    [Fact]
    public void Time_IsBcdFromTheClock()
    {
        var r = new Rtc();
        Assert.Equal(0x07, r.Get(RTC_SECONDS));
        Assert.Equal(0x45, r.Get(RTC_MINUTES));
        Assert.Equal(0x13, r.Get(RTC_HOURS));
        Assert.Equal(0x05, r.Get(RTC_DAY_OF_WEEK)); // Thursday; 1 = Sunday
        Assert.Equal(0x26, r.Get(RTC_DAY_OF_MONTH));
        Assert.Equal(0x11, r.Get(RTC_MONTH));
        Assert.Equal(0x26, r.Get(RTC_YEAR));
        Assert.Equal(0x20, r.Get(RTC_CENTURY));
        r.Now = r.Now.AddSeconds(10);
        Assert.Equal(0x17, r.Get(RTC_SECONDS));
    }

    [Fact]
    public void Time_IsBinaryWhenDmSet()
    {
        var r = new Rtc();
        r.Set(RTC_REG_B, RTC_24H | RTC_DM_BINARY);
        Assert.Equal(7, r.Get(RTC_SECONDS));
        Assert.Equal(45, r.Get(RTC_MINUTES));
        Assert.Equal(13, r.Get(RTC_HOURS));
        Assert.Equal(26, r.Get(RTC_DAY_OF_MONTH));
        Assert.Equal(11, r.Get(RTC_MONTH));
        Assert.Equal(26, r.Get(RTC_YEAR));
        Assert.Equal(20, r.Get(RTC_CENTURY));
    }

    [Theory]
    [InlineData(13, 0x81)] // 1 PM
    [InlineData(0, 0x12)]  // midnight is 12 AM
    [InlineData(12, 0x92)] // noon is 12 PM
    [InlineData(11, 0x11)]
    public void Hours_In12HourModeCarryPmBit(int hour, byte expected)
    {
        var r = new Rtc();
        r.Now = new DateTime(2026, 1, 1, hour, 0, 0, DateTimeKind.Utc);
        r.Set(RTC_REG_B, 0); // 12-hour, BCD
        Assert.Equal(expected, r.Get(RTC_HOURS));
    }

    [Fact]
    public void Hours_In12HourBinaryMode()
    {
        var r = new Rtc();
        r.Set(RTC_REG_B, RTC_DM_BINARY);
        Assert.Equal(0x80 | 1, r.Get(RTC_HOURS));
    }

    [Fact]
    public void Uip_SetOnlyJustBeforeTheUpdate()
    {
        var r = new Rtc();
        Assert.Equal(0, r.Get(RTC_REG_A) & RTC_UIP); // .500
        r.Now = new DateTime(2026, 11, 26, 13, 45, 7, DateTimeKind.Utc).AddTicks(TimeSpan.TicksPerSecond - 100);
        Assert.NotEqual(0, r.Get(RTC_REG_A) & RTC_UIP);
        r.Now = r.Now.AddTicks(200); // the update happened
        Assert.Equal(0, r.Get(RTC_REG_A) & RTC_UIP);
        Assert.Equal(0x08, r.Get(RTC_SECONDS));
    }

    [Fact]
    public void Uip_NeverStuckWithARealClock()
    {
        var rtc = new CmosRtc(() => DateTime.UtcNow, 256 * MiB, 0);
        Span<byte> b = stackalloc byte[1];
        rtc.Write(0, [RTC_REG_A]);
        var deadline = DateTime.UtcNow.AddSeconds(2);
        do
        {
            rtc.Read(1, b);
            if ((b[0] & RTC_UIP) == 0)
                return;
        } while (DateTime.UtcNow < deadline);
        Assert.Fail("UIP stayed set");
    }

    [Fact]
    public void RegisterA_WritableExceptUip()
    {
        var r = new Rtc();
        r.Set(RTC_REG_A, 0xA6);
        Assert.Equal(0x26, r.Get(RTC_REG_A));
    }

    [Fact]
    public void RegisterC_ReportsUpdateEndedAndClearsOnRead()
    {
        var r = new Rtc();
        Assert.Equal(0, r.Get(RTC_REG_C));
        r.Now = r.Now.AddSeconds(1);
        Assert.Equal(0x10, r.Get(RTC_REG_C));
        Assert.Equal(0, r.Get(RTC_REG_C));
        r.Set(RTC_REG_B, RTC_24H | RTC_UIE);
        r.Now = r.Now.AddSeconds(1);
        Assert.Equal(0x90, r.Get(RTC_REG_C));
        r.Set(RTC_REG_C, 0xFF);
        Assert.Equal(0, r.Get(RTC_REG_C));
        r.Set(RTC_REG_D, 0);
        Assert.Equal(0x80, r.Get(RTC_REG_D));
    }

    [Fact]
    public void GuestSetTime_WithSetBit_PersistsAsOffsetFromHostTime()
    {
        var r = new Rtc();
        // Linux mc146818_set_time: SET, write fields (any order), clear SET.
        r.Set(RTC_REG_B, RTC_SET | RTC_24H | RTC_UIE);
        Assert.Equal(RTC_SET | RTC_24H, r.Get(RTC_REG_B)); // SET clears UIE
        r.Set(RTC_YEAR, 0x27);
        r.Set(RTC_MONTH, 0x02);
        r.Set(RTC_DAY_OF_MONTH, 0x28);
        r.Set(RTC_HOURS, 0x08);
        r.Set(RTC_MINUTES, 0x30);
        r.Set(RTC_SECONDS, 0x00);
        r.Now = r.Now.AddSeconds(5);
        Assert.Equal(0x00, r.Get(RTC_SECONDS)); // frozen while SET
        r.Set(RTC_REG_B, RTC_24H);

        r.Now = r.Now.AddSeconds(61);
        Assert.Equal(0x01, r.Get(RTC_SECONDS));
        Assert.Equal(0x31, r.Get(RTC_MINUTES));
        Assert.Equal(0x08, r.Get(RTC_HOURS));
        Assert.Equal(0x28, r.Get(RTC_DAY_OF_MONTH));
        Assert.Equal(0x02, r.Get(RTC_MONTH));
        Assert.Equal(0x27, r.Get(RTC_YEAR));
        Assert.Equal(0x20, r.Get(RTC_CENTURY));
        Assert.Equal(0x01, r.Get(RTC_DAY_OF_WEEK)); // 2027-02-28 is a Sunday
    }

    [Fact]
    public void GuestSetTime_PassingThroughAnInvalidDate_IsClampedNotThrown()
    {
        var r = new Rtc();
        r.Now = new DateTime(2026, 1, 31, 0, 0, 0, DateTimeKind.Utc);
        r.Set(RTC_REG_B, RTC_SET | RTC_24H);
        r.Set(RTC_MONTH, 0x02); // February 31 for a moment
        Assert.Equal(0x31, r.Get(RTC_DAY_OF_MONTH));
        r.Set(RTC_DAY_OF_MONTH, 0x14);
        r.Set(RTC_REG_B, RTC_24H);
        Assert.Equal(0x14, r.Get(RTC_DAY_OF_MONTH));
        Assert.Equal(0x02, r.Get(RTC_MONTH));

        // Garbage committed directly: clamped.
        r.Set(RTC_MONTH, 0x99);
        Assert.Equal(0x12, r.Get(RTC_MONTH));
    }

    [Fact]
    public void GuestSetTime_WithoutSetBit_TakesEffectAtOnce()
    {
        var r = new Rtc();
        r.Set(RTC_MINUTES, 0x00);
        Assert.Equal(0x00, r.Get(RTC_MINUTES));
        Assert.Equal(0x07, r.Get(RTC_SECONDS));
        Assert.Equal(0x13, r.Get(RTC_HOURS));
        r.Now = r.Now.AddMinutes(2);
        Assert.Equal(0x02, r.Get(RTC_MINUTES));
    }

    [Fact]
    public void GuestSetTime_In12HourMode()
    {
        var r = new Rtc();
        r.Set(RTC_REG_B, 0);
        r.Set(RTC_HOURS, 0x80 | 0x12); // 12 PM
        r.Set(RTC_REG_B, RTC_24H);
        Assert.Equal(0x12, r.Get(RTC_HOURS));
        r.Set(RTC_REG_B, 0);
        r.Set(RTC_HOURS, 0x12); // 12 AM
        r.Set(RTC_REG_B, RTC_24H);
        Assert.Equal(0x00, r.Get(RTC_HOURS));
    }

    [Fact]
    public void GuestSetTime_AtTheEndOfTime_DoesNotThrowLater()
    {
        var r = new Rtc();
        r.Set(RTC_REG_B, RTC_SET | RTC_24H);
        r.Set(RTC_CENTURY, 0x99);
        r.Set(RTC_YEAR, 0x99);
        r.Set(RTC_MONTH, 0x12);
        r.Set(RTC_DAY_OF_MONTH, 0x31);
        r.Set(RTC_HOURS, 0x23);
        r.Set(RTC_MINUTES, 0x59);
        r.Set(RTC_SECONDS, 0x59);
        r.Set(RTC_REG_B, RTC_24H);
        r.Now = r.Now.AddDays(2);
        Assert.Equal(0x99, r.Get(RTC_YEAR));
        Assert.Equal(0x59, r.Get(RTC_SECONDS));
        r.Get(RTC_REG_A);
        r.Get(RTC_REG_C);
    }

    [Fact]
    public void Index_IgnoresNmiBit_AndIndexPortReadsFF()
    {
        var r = new Rtc();
        r.Device.Write(0, [0x80 | RTC_MINUTES]);
        Span<byte> b = stackalloc byte[1];
        r.Device.Read(1, b);
        Assert.Equal(0x45, b[0]);
        r.Device.Read(0, b);
        Assert.Equal(0xFF, b[0]);
    }

    [Fact]
    public void Nvram_ReadsBackWrites()
    {
        var r = new Rtc();
        r.Set(0x40, 0xA5);
        r.Set(0x7F, 0x5A);
        Assert.Equal(0xA5, r.Get(0x40));
        Assert.Equal(0x5A, r.Get(0x7F));
        Assert.Equal(0x5A, r.Get(0xFF)); // index 0x7F with the NMI bit
    }

    [Fact]
    public void MemoryBytes_ForThreeGiBBelowAndOneGiBAbove4G()
    {
        var r = new Rtc(3 * GiB, 1 * GiB);
        Assert.Equal(640, r.Get(0x15) | r.Get(0x16) << 8);
        Assert.Equal(0xFFFF, r.Get(0x17) | r.Get(0x18) << 8);
        Assert.Equal(0xFFFF, r.Get(0x30) | r.Get(0x31) << 8);
        Assert.Equal((int)((3 * GiB - 16 * MiB) / 65536), r.Get(0x34) | r.Get(0x35) << 8);
        Assert.Equal((int)(1 * GiB / 65536), r.Get(0x5B) | r.Get(0x5C) << 8 | r.Get(0x5D) << 16);
    }

    [Fact]
    public void MemoryBytes_ForSmallGuest()
    {
        var r = new Rtc(8 * MiB, 0);
        Assert.Equal(640, r.Get(0x15) | r.Get(0x16) << 8);
        Assert.Equal(7 * 1024, r.Get(0x17) | r.Get(0x18) << 8);
        Assert.Equal(0, r.Get(0x34) | r.Get(0x35) << 8);
        Assert.Equal(0, r.Get(0x5B) | r.Get(0x5C) | r.Get(0x5D));
        int sum = 0;
        for (byte i = 0x10; i <= 0x2D; i++)
            sum += r.Get(i);
        Assert.Equal(sum, r.Get(0x2E) << 8 | r.Get(0x2F));
    }

    [Fact]
    public void MemoryBytes_AboveFourGiBUseThreeBytes()
    {
        var r = new Rtc(2 * GiB, 1024 * GiB); // 1 TiB above 4G = 0x1000000 units: clamped to 24 bits
        Assert.Equal(0xFFFFFF, r.Get(0x5B) | r.Get(0x5C) << 8 | r.Get(0x5D) << 16);
        var s = new Rtc(2 * GiB, 300 * GiB);
        Assert.Equal((int)(300 * GiB / 65536), s.Get(0x5B) | s.Get(0x5C) << 8 | s.Get(0x5D) << 16);
    }

    [Fact]
    public void Constructor_RejectsMoreThan4GiBBelow4G()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new CmosRtc(() => Start, 5 * GiB, 0));
    }

    [Fact]
    public void BusAtPort70_RoutesIndexAndData()
    {
        var bus = new Bus();
        bus.Insert(new CmosRtc(() => Start, 512 * MiB, 0), 0x70, CmosRtc.PortCount);
        Assert.True(bus.TryWrite(0x70, [RTC_HOURS]));
        Span<byte> b = stackalloc byte[1];
        Assert.True(bus.TryRead(0x71, b));
        Assert.Equal(0x13, b[0]);
        Assert.False(bus.TryRead(0x72, b));
    }
}
