using KvmSharp.Interop;

namespace KvmSharp.Vmm.Console;

/// <summary>
/// Feeds host stdin to the guest's console (the UART or virtio-console) as a source of the I/O
/// thread, so the device's receive path runs there like every other queue. On a TTY the terminal
/// is put in raw mode and <c>Ctrl-A x</c> quits (<c>Ctrl-A Ctrl-A</c> sends one Ctrl-A), as QEMU's
/// mux does; from a pipe every byte passes through unchanged. EOF simply stops the reading: the
/// guest goes on.
/// </summary>
/// <remarks>
/// <para>Back-pressure: bytes the device cannot take yet stay here, stdin is not polled meanwhile,
/// and the loop retries after <see cref="EventLoop.RetryDelayMilliseconds"/> (neither the UART
/// nor the console has an event for "room again").</para>
/// <para>stdin that epoll cannot watch (a regular file, /dev/null) is always ready: it is read
/// one buffer per loop round until EOF.</para>
/// </remarks>
internal sealed class ConsoleInput : IEventHandler, IDisposable
{
    private const byte CtrlA = 0x01;
    private const int BufferSize = 256;

    private readonly int _fd;
    private readonly EventLoop _loop;
    private readonly Func<ReadOnlySpan<byte>, int> _deliver;
    private readonly Action _quit;
    private readonly Libc.Termios? _saved;
    private readonly bool _escapes;

    // I/O thread only.
    private readonly byte[] _read = new byte[BufferSize];
    private readonly byte[] _pending = new byte[BufferSize];
    private int _pendingStart;
    private int _pendingCount;
    private bool _escape;
    private bool _polled;
    private bool _paused;
    private bool _stopped;

    /// <summary>Reads <paramref name="fd"/> (raw mode and escapes when it is a terminal).</summary>
    public ConsoleInput(int fd, EventLoop loop, Func<ReadOnlySpan<byte>, int> deliver, Action quit)
        : this(fd, loop, deliver, quit, escapes: null)
    {
    }

    /// <summary>For tests: <paramref name="escapes"/> forces the Ctrl-A handling on or off
    /// without touching the terminal; null decides by isatty and makes a terminal raw.</summary>
    internal ConsoleInput(int fd, EventLoop loop, Func<ReadOnlySpan<byte>, int> deliver, Action quit, bool? escapes)
    {
        _fd = fd;
        _loop = loop;
        _deliver = deliver;
        _quit = quit;
        if (escapes is { } e)
        {
            _escapes = e;
        }
        else
        {
            _saved = Libc.MakeRaw(fd);
            _escapes = _saved.HasValue;
        }
    }

    public bool IsTerminal => _saved.HasValue;

    /// <summary>Registers with the event loop.</summary>
    public void Start()
    {
        try
        {
            _loop.Add(_fd, Libc.EPOLLIN, this);
            _polled = true;
        }
        catch (NativeException e) when (e.Errno == EPERM)
        {
            _loop.AddReady(this);
        }
    }

    private const int EPERM = 1;

    public EventResult Process(uint events)
    {
        if (_stopped)
            return EventResult.Done;
        if (_pendingCount > 0 && !Flush())
            return EventResult.Later;
        if (_paused)
        {
            _paused = false;
            _loop.Modify(_fd, Libc.EPOLLIN);
        }
        if (_polled && events == 0)
            return EventResult.Done; // a retry: the fd reports its own readiness
        int n = Libc.Read(_fd, _read);
        if (n <= 0)
        {
            Stop(); // EOF or error: stop reading, keep the VM running.
            return EventResult.Done;
        }
        _pendingStart = 0;
        _pendingCount = _escapes ? Filter(_read.AsSpan(0, n), _pending, ref _escape, out bool quit) : Copy(n, out quit);
        if (quit)
        {
            Flush(); // what was typed before the escape, as far as it fits
            Stop();
            _quit();
            return EventResult.Done;
        }
        if (!Flush())
        {
            if (_polled)
            {
                _paused = true;
                _loop.Modify(_fd, 0);
            }
            return EventResult.Later;
        }
        return _polled ? EventResult.Done : EventResult.MoreWork;
    }

    private int Copy(int n, out bool quit)
    {
        quit = false;
        _read.AsSpan(0, n).CopyTo(_pending);
        return n;
    }

    /// <summary>Hands pending bytes to the device; false while some are left.</summary>
    private bool Flush()
    {
        while (_pendingCount > 0)
        {
            int accepted = _deliver(_pending.AsSpan(_pendingStart, _pendingCount));
            if (accepted <= 0)
                return false; // the device's buffer is full: wait for the guest to drain it
            _pendingStart += accepted;
            _pendingCount -= accepted;
        }
        return true;
    }

    private void Stop()
    {
        _stopped = true;
        if (_polled)
            _loop.Remove(_fd);
    }

    /// <summary>
    /// The terminal escape: Ctrl-A x (or X) quits, Ctrl-A Ctrl-A sends one Ctrl-A, Ctrl-A and any
    /// other byte sends nothing. <paramref name="escape"/> carries a Ctrl-A across reads.
    /// </summary>
    /// <returns>Bytes written to <paramref name="output"/> (at most <paramref name="input"/>'s length);
    /// the bytes after a quit are dropped.</returns>
    internal static int Filter(ReadOnlySpan<byte> input, Span<byte> output, ref bool escape, out bool quit)
    {
        quit = false;
        int m = 0;
        foreach (byte b in input)
        {
            if (escape)
            {
                escape = false;
                if (b is (byte)'x' or (byte)'X')
                {
                    quit = true;
                    return m;
                }
                if (b != CtrlA)
                    continue;
            }
            else if (b == CtrlA)
            {
                escape = true;
                continue;
            }
            output[m++] = b;
        }
        return m;
    }

    public void Dispose()
    {
        if (_saved is { } saved)
            Libc.RestoreTerminal(_fd, saved);
    }
}
