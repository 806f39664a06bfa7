namespace KvmSharp.Devices.Tests;

public class RateLimitedLogTests
{
    private static string[] Lines(StringWriter w) =>
        w.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.TrimEnd('\r')).ToArray();

    [Fact]
    public void WritesHexWithPrefix()
    {
        var sink = new StringWriter();
        var log = new RateLimitedLog(sink, 10, TimeSpan.FromSeconds(1));
        Assert.True(log.Write("unclaimed port ", 0x3f9));
        Assert.True(log.Write("unclaimed mmio ", ulong.MaxValue));
        Assert.Equal(["unclaimed port 0x3f9", "unclaimed mmio 0xffffffffffffffff"], Lines(sink));
    }

    [Fact]
    public void SuppressesBeyondBurstAndReportsCountInNextPeriod()
    {
        var sink = new StringWriter();
        var time = new ManualTime();
        var log = new RateLimitedLog(sink, 2, TimeSpan.FromSeconds(1), time);
        for (int i = 0; i < 5; i++)
            log.Write("port ", (ulong)i);
        Assert.Equal(["port 0x0", "port 0x1"], Lines(sink));
        Assert.Equal(3, log.SuppressedCount);
        Assert.Equal(2, log.WrittenCount);

        time.Advance(TimeSpan.FromMilliseconds(999));
        Assert.False(log.Write("still limited"));
        time.Advance(TimeSpan.FromMilliseconds(2));
        Assert.True(log.Write("again"));
        Assert.Equal(["port 0x0", "port 0x1", "(4 similar messages suppressed)", "again"], Lines(sink));
        Assert.Equal(4, log.SuppressedCount);
    }

    [Fact]
    public void InterpolatedMessage_FormatsOnlyWhenAdmitted()
    {
        var sink = new StringWriter();
        var time = new ManualTime();
        var log = new RateLimitedLog(sink, 1, TimeSpan.FromSeconds(1), time);
        int formatted = 0;
        var probe = new FormatProbe(() => formatted++);
        Assert.True(log.Write($"bad descriptor {probe} at {0x1234:x}"));
        Assert.False(log.Write($"bad descriptor {probe} at {0x1234:x}"));
        Assert.Equal(1, formatted);
        Assert.Equal(["bad descriptor probe at 1234"], Lines(sink));
    }

    [Fact]
    public void SuppressedMessages_DoNotAllocate()
    {
        var sink = new StringWriter();
        var log = new RateLimitedLog(sink, 1, TimeSpan.FromHours(1), new ManualTime());
        ulong port = 0x3f9;
        log.Write("unclaimed port ", port);
        log.Write("unclaimed port ", port);
        log.Write($"unclaimed port 0x{port:x} width {4}");
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 1000; i++)
        {
            log.Write("unclaimed port ", port);
            log.Write($"unclaimed port 0x{port:x} width {i}");
        }
        Assert.Equal(before, GC.GetAllocatedBytesForCurrentThread());
        Assert.Equal(2002, log.SuppressedCount);
    }

    [Fact]
    public void Constructor_ValidatesArguments()
    {
        Assert.Throws<ArgumentNullException>(() => new RateLimitedLog(null!, 1, TimeSpan.FromSeconds(1)));
        Assert.Throws<ArgumentOutOfRangeException>(() => new RateLimitedLog(TextWriter.Null, 0, TimeSpan.FromSeconds(1)));
        Assert.Throws<ArgumentOutOfRangeException>(() => new RateLimitedLog(TextWriter.Null, 1, TimeSpan.Zero));
    }

    private sealed class FormatProbe(Action onFormat)
    {
        public override string ToString()
        {
            onFormat();
            return "probe";
        }
    }
}
