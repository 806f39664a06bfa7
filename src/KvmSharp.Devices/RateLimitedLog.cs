using System.Runtime.CompilerServices;

namespace KvmSharp.Devices;

/// <summary>
/// A log for guest-caused events ("unclaimed port 0x…", a bad descriptor) that the guest can
/// repeat at will: at most <c>burst</c> messages are written per <c>period</c>, the rest are
/// counted and reported in one line when the next period lets a message through (firecracker
/// logger/rate_limited.rs). A suppressed message costs a lock and a counter, never an allocation.
/// </summary>
/// <remarks>
/// Thread-safe. Use <see cref="Write(string, ulong)"/> for the common "text + number" case, or
/// <see cref="Write(ref RateLimitedLog.MessageHandler)"/> with an interpolated string: the handler
/// asks the limiter first and skips all formatting when the message would be suppressed.
/// Messages are written with <see cref="TextWriter.WriteLine()"/> and flushed.
/// </remarks>
public sealed class RateLimitedLog
{
    private readonly TextWriter _sink;
    private readonly int _burst;
    private readonly long _periodTicks; // in TimeProvider timestamp units
    private readonly TimeProvider _time;

    // Lock order: taken alone; the sink is written while holding it so lines don't interleave.
    private readonly Lock _lock = new();
    private long _windowStart;
    private int _inWindow;
    private long _pendingSuppressed;
    private long _suppressedTotal;
    private long _writtenTotal;

    /// <summary>Creates a log that writes at most <paramref name="burst"/> messages per
    /// <paramref name="period"/> to <paramref name="sink"/>, timed by the system clock.</summary>
    /// <exception cref="ArgumentNullException"><paramref name="sink"/> is null.</exception>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="burst"/> is not positive
    /// or <paramref name="period"/> is not positive.</exception>
    public RateLimitedLog(TextWriter sink, int burst, TimeSpan period)
        : this(sink, burst, period, TimeProvider.System)
    {
    }

    /// <summary>As the other constructor, timed by <paramref name="timeProvider"/>'s timestamps.</summary>
    /// <exception cref="ArgumentNullException"><paramref name="sink"/> or
    /// <paramref name="timeProvider"/> is null.</exception>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="burst"/> is not positive
    /// or <paramref name="period"/> is not positive.</exception>
    public RateLimitedLog(TextWriter sink, int burst, TimeSpan period, TimeProvider timeProvider)
    {
        ArgumentNullException.ThrowIfNull(sink);
        ArgumentNullException.ThrowIfNull(timeProvider);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(burst);
        ArgumentOutOfRangeException.ThrowIfLessThanOrEqual(period, TimeSpan.Zero);
        _sink = sink;
        _burst = burst;
        _time = timeProvider;
        _periodTicks = Math.Max(1, (long)(period.TotalSeconds * timeProvider.TimestampFrequency));
        _windowStart = timeProvider.GetTimestamp();
    }

    /// <summary>Messages suppressed since creation.</summary>
    public long SuppressedCount => Interlocked.Read(ref _suppressedTotal);

    /// <summary>Messages written since creation (not counting "suppressed" summary lines).</summary>
    public long WrittenCount => Interlocked.Read(ref _writtenTotal);

    /// <summary>Writes <paramref name="message"/> unless the limit is reached.</summary>
    /// <returns>True when written, false when suppressed.</returns>
    public bool Write(string message)
    {
        lock (_lock)
        {
            if (!AdmitLocked())
                return false;
            _sink.WriteLine(message);
            _sink.Flush();
            return true;
        }
    }

    /// <summary>Writes <paramref name="prefix"/> followed by <paramref name="value"/> as
    /// "0x" and lower-case hex (e.g. "unclaimed port " + 0x3f9), unless the limit is reached.
    /// Allocates nothing.</summary>
    /// <returns>True when written, false when suppressed.</returns>
    public bool Write(string prefix, ulong value)
    {
        lock (_lock)
        {
            if (!AdmitLocked())
                return false;
            Span<char> hex = stackalloc char[18];
            hex[0] = '0';
            hex[1] = 'x';
            value.TryFormat(hex[2..], out int n, "x", provider: null);
            _sink.Write(prefix);
            _sink.Write(hex[..(n + 2)]);
            _sink.WriteLine();
            _sink.Flush();
            return true;
        }
    }

    /// <summary>Writes an interpolated message, formatting it only when the limit lets it through.</summary>
    /// <returns>True when written, false when suppressed.</returns>
    public bool Write([InterpolatedStringHandlerArgument("")] ref MessageHandler message)
    {
        if (!message.Admitted)
            return false;
        string text = message.ToStringAndClear();
        lock (_lock)
        {
            _sink.WriteLine(text);
            _sink.Flush();
        }
        return true;
    }

    /// <summary>Takes one message slot; false (and counts a suppression) when the limit is reached.</summary>
    private bool Admit()
    {
        lock (_lock)
            return AdmitLocked();
    }

    private bool AdmitLocked()
    {
        long now = _time.GetTimestamp();
        if (now - _windowStart >= _periodTicks)
        {
            _windowStart = now;
            _inWindow = 0;
            if (_pendingSuppressed != 0)
            {
                // Report what the previous windows swallowed before the first new message.
                Span<char> digits = stackalloc char[20];
                _pendingSuppressed.TryFormat(digits, out int n, provider: null);
                _sink.Write("(");
                _sink.Write(digits[..n]);
                _sink.WriteLine(" similar messages suppressed)");
                _pendingSuppressed = 0;
            }
        }
        if (_inWindow >= _burst)
        {
            _pendingSuppressed++;
            Interlocked.Increment(ref _suppressedTotal);
            return false;
        }
        _inWindow++;
        Interlocked.Increment(ref _writtenTotal);
        return true;
    }

    /// <summary>
    /// Interpolated string handler for <see cref="Write(ref MessageHandler)"/>: consults the
    /// limiter before any formatting, so a suppressed message allocates nothing.
    /// </summary>
    [InterpolatedStringHandler]
    public ref struct MessageHandler
    {
        private DefaultInterpolatedStringHandler _inner;

        /// <summary>Whether the limiter let this message through.</summary>
        public bool Admitted { get; }

        /// <summary>Called by the compiler.</summary>
        public MessageHandler(int literalLength, int formattedCount, RateLimitedLog log, out bool shouldAppend)
        {
            ArgumentNullException.ThrowIfNull(log);
            Admitted = shouldAppend = log.Admit();
            _inner = shouldAppend
                ? new DefaultInterpolatedStringHandler(literalLength, formattedCount)
                : default;
        }

        /// <summary>Called by the compiler.</summary>
        public void AppendLiteral(string value) => _inner.AppendLiteral(value);

        /// <summary>Called by the compiler.</summary>
        public void AppendFormatted<T>(T value) => _inner.AppendFormatted(value);

        /// <summary>Called by the compiler.</summary>
        public void AppendFormatted<T>(T value, string? format) => _inner.AppendFormatted(value, format);

        /// <summary>Called by the compiler.</summary>
        public void AppendFormatted<T>(T value, int alignment) => _inner.AppendFormatted(value, alignment);

        /// <summary>Called by the compiler.</summary>
        public void AppendFormatted<T>(T value, int alignment, string? format) =>
            _inner.AppendFormatted(value, alignment, format);

        /// <summary>Called by the compiler.</summary>
        public void AppendFormatted(ReadOnlySpan<char> value) => _inner.AppendFormatted(value);

        /// <summary>Called by the compiler.</summary>
        public void AppendFormatted(string? value) => _inner.AppendFormatted(value);

        internal string ToStringAndClear() => _inner.ToStringAndClear();
    }
}
