using KvmSharp.Interop;

namespace KvmSharp.Vmm;

/// <summary>
/// The VM's one epoll I/O thread (design.md: threads): queue eventfds (a guest kicked a queue),
/// the TAP, the console input, sockets and timers are registered here with one handler object
/// each, and the thread calls the handler on the event.
/// </summary>
/// <remarks>
/// <para><b>Hot path.</b> The epoll data of a source is its index in a copy-on-write array plus
/// a generation (so a stale event for a removed source whose slot was reused is dropped): an
/// event costs one volatile read and an array index, no lock and no look-up. Registration takes
/// a lock and copies the array; it may come from any thread.</para>
/// <para><b>Fairness.</b> A handler that returns <see cref="EventResult.MoreWork"/> is called
/// again after the other ready events of the next round (epoll is polled without waiting while
/// such work is queued), never spun on; <see cref="EventResult.Later"/> waits
/// <see cref="RetryDelayMilliseconds"/>. Nothing is allocated per event.</para>
/// </remarks>
public sealed unsafe class EventLoop : IDisposable
{
    /// <summary>How long a handler that returned <see cref="EventResult.Later"/> waits.</summary>
    public const int RetryDelayMilliseconds = 5;

    private const int MaxEvents = 32;
    private const ulong WakeToken = ulong.MaxValue;

    private readonly FileDescriptor _epoll = Libc.EpollCreate();
    private readonly FileDescriptor _wake = Libc.EventFd();
    private readonly Thread _thread;
    private volatile bool _stopping;
    private bool _disposed; // under _lock: the epoll fd is closed, registration is a no-op

    // Writers (any thread) serialise on _lock and publish a new array; the loop only reads it.
    private readonly Lock _lock = new();
    private Source?[] _sources = [];
    private uint _generation;
    private readonly List<Source> _incoming = []; // AddReady from other threads, under _lock

    // Loop thread only.
    private List<Source> _rerun = new(16);        // asked for more in the last round: called after this round's events
    private List<Source> _collect = new(16);      // asking for more in this round
    private readonly List<Source> _later = new(8);

    public EventLoop()
    {
        var ev = new Libc.EpollEvent { events = Libc.EPOLLIN, data = WakeToken };
        if (Libc.epoll_ctl(_epoll.Fd, Libc.EPOLL_CTL_ADD, _wake.Fd, &ev) != 0)
            Libc.ThrowNative("epoll_ctl(ADD)", Libc.LastErrno);
        _thread = new Thread(Loop) { Name = "io", IsBackground = true };
    }

    /// <summary>Unhandled exceptions from handlers end the VM through this callback.</summary>
    public Action<Exception>? OnError { get; set; }

    /// <summary>Calls <paramref name="handler"/> when <paramref name="fd"/> reports <paramref name="events"/>.</summary>
    /// <exception cref="NativeException">epoll_ctl failed (EPERM: the fd cannot be polled, e.g. a regular file).</exception>
    public void Add(int fd, uint events, IEventHandler handler)
    {
        ArgumentNullException.ThrowIfNull(handler);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var source = new Source(handler, fd, ++_generation);
            int index = Array.IndexOf(_sources, null);
            Source?[] sources = index >= 0 ? (Source?[])_sources.Clone() : [.. _sources, null];
            if (index < 0)
                index = sources.Length - 1;
            sources[index] = source;
            source.Token = (ulong)source.Generation << 32 | (uint)index;
            var ev = new Libc.EpollEvent { events = events, data = source.Token };
            // Publish before epoll can report the fd.
            Volatile.Write(ref _sources, sources);
            if (Libc.epoll_ctl(_epoll.Fd, Libc.EPOLL_CTL_ADD, fd, &ev) != 0)
            {
                int errno = Libc.LastErrno;
                sources = (Source?[])sources.Clone();
                sources[index] = null;
                Volatile.Write(ref _sources, sources);
                Libc.ThrowNative("epoll_ctl(ADD)", errno);
            }
        }
    }

    /// <summary>
    /// A source without a pollable fd (a regular file or /dev/null as console input is always
    /// "ready", and epoll refuses it): the loop calls <paramref name="handler"/> once as if an
    /// event came, then again as long as it asks to.
    /// </summary>
    public void AddReady(IEventHandler handler)
    {
        ArgumentNullException.ThrowIfNull(handler);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            _incoming.Add(new Source(handler, -1, 0));
            Libc.EventFdWrite(_wake.Fd);
        }
    }

    /// <summary>Changes the events watched on <paramref name="fd"/> (0: none until changed again).</summary>
    public void Modify(int fd, uint events)
    {
        lock (_lock)
        {
            if (_disposed || Find(fd) is not { } source)
                return;
            var ev = new Libc.EpollEvent { events = events, data = source.Token };
            if (Libc.epoll_ctl(_epoll.Fd, Libc.EPOLL_CTL_MOD, fd, &ev) != 0)
                Libc.ThrowNative("epoll_ctl(MOD)", Libc.LastErrno);
        }
    }

    /// <summary>Stops watching <paramref name="fd"/> (before it is closed); its handler is not called again.</summary>
    public void Remove(int fd)
    {
        lock (_lock)
        {
            if (_disposed || Find(fd) is not { } source)
                return;
            Libc.epoll_ctl(_epoll.Fd, Libc.EPOLL_CTL_DEL, fd, null);
            source.Removed = true;
            var sources = (Source?[])_sources.Clone();
            sources[Array.IndexOf(_sources, source)] = null;
            Volatile.Write(ref _sources, sources);
        }
    }

    private Source? Find(int fd)
    {
        foreach (Source? s in _sources)
        {
            if (s is not null && s.Fd == fd)
                return s;
        }
        return null;
    }

    public void Start() => _thread.Start();

    private void Loop()
    {
        var events = stackalloc Libc.EpollEvent[MaxEvents];
        while (!_stopping)
        {
            int n = Libc.epoll_wait(_epoll.Fd, events, MaxEvents, Timeout());
            if (n < 0)
            {
                if (Libc.LastErrno == Libc.EINTR)
                    continue;
                OnError?.Invoke(new NativeException("epoll_wait", Libc.LastErrno));
                return;
            }
            try
            {
                Source?[] sources = Volatile.Read(ref _sources);
                for (int i = 0; i < n; i++)
                {
                    ulong token = events[i].data;
                    if (token == WakeToken)
                    {
                        Libc.EventFdRead(_wake.Fd);
                        TakeIncoming();
                        continue;
                    }
                    uint index = (uint)token;
                    if (index < (uint)sources.Length && sources[index] is { } s && s.Token == token)
                        Run(s, events[i].events);
                }
                RunDue();
                // Sources that asked for more in the last round, after this round's events.
                foreach (Source s in _rerun)
                {
                    s.Queued = false;
                    Run(s, 0);
                }
                _rerun.Clear();
                (_rerun, _collect) = (_collect, _rerun);
            }
            catch (Exception e)
            {
                // A device back end failing must end the VM, not kill the process.
                OnError?.Invoke(e);
                return;
            }
        }
    }

    private int Timeout()
    {
        if (_rerun.Count > 0)
            return 0;
        if (_later.Count == 0)
            return -1;
        long now = Environment.TickCount64;
        long first = long.MaxValue;
        foreach (Source s in _later)
            first = Math.Min(first, s.Due);
        return (int)Math.Clamp(first - now, 0, RetryDelayMilliseconds);
    }

    private void Run(Source s, uint events)
    {
        if (s.Removed)
            return;
        switch (s.Handler.Process(events))
        {
            case EventResult.MoreWork when !s.Queued:
                s.Queued = true;
                _collect.Add(s);
                break;
            case EventResult.Later when s.Due == 0:
                s.Due = Environment.TickCount64 + RetryDelayMilliseconds;
                _later.Add(s);
                break;
            default:
                break;
        }
    }

    private void RunDue()
    {
        if (_later.Count == 0)
            return;
        long now = Environment.TickCount64;
        for (int i = _later.Count - 1; i >= 0; i--)
        {
            Source s = _later[i];
            if (s.Due > now)
                continue;
            _later.RemoveAt(i);
            s.Due = 0;
            Run(s, 0);
        }
    }

    private void TakeIncoming()
    {
        lock (_lock)
        {
            foreach (Source s in _incoming)
            {
                s.Queued = true;
                _collect.Add(s); // called in the next round
            }
            _incoming.Clear();
        }
    }

    public void Dispose()
    {
        _stopping = true;
        lock (_lock)
        {
            if (!_disposed)
                Libc.EventFdWrite(_wake.Fd);
        }
        if (_thread.IsAlive)
            _thread.Join();
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
        }
        _epoll.Dispose();
        _wake.Dispose();
    }

    /// <summary>A registered source. Queued/Due are the loop thread's; Removed is set by Remove.</summary>
    private sealed class Source(IEventHandler handler, int fd, uint generation)
    {
        public IEventHandler Handler { get; } = handler;

        public int Fd { get; } = fd;

        public uint Generation { get; } = generation;

        public ulong Token { get; set; } = ulong.MaxValue - 1;

        public bool Queued { get; set; }

        public long Due { get; set; }

        public volatile bool Removed;
    }
}
