using KvmSharp.Interop;

namespace KvmSharp.Vmm;

/// <summary>What the I/O thread calls when a registered fd becomes ready.</summary>
public interface IEventHandler
{
    /// <summary>Handles readiness of <paramref name="fd"/>; <paramref name="events"/> is the epoll mask.</summary>
    void Process(int fd, uint events);
}

/// <summary>
/// The VM's one epoll I/O thread (design.md: threads): ioeventfds (a guest kicked a queue), TAP fds,
/// sockets and timers are registered here with a handler; the thread calls the handler on the
/// event. Registration happens before <see cref="Start"/> or from the loop itself, so the handler
/// table needs no lock on the hot path; no allocation per event.
/// </summary>
public sealed unsafe class EventLoop : IDisposable
{
    private const int MaxEvents = 32;
    private readonly FileDescriptor _epoll = Libc.EpollCreate();
    private readonly FileDescriptor _wake = Libc.EventFd();
    // Written by vCPU threads (a BAR moved, so its ioeventfds did) while the loop reads it: guarded.
    private readonly Dictionary<int, IEventHandler> _handlers = [];
    private readonly Lock _handlersLock = new();
    private readonly Thread _thread;
    private volatile bool _stopping;

    public EventLoop()
    {
        Add(_wake.Fd, Libc.EPOLLIN, null!);
        _thread = new Thread(Loop) { Name = "io", IsBackground = true };
    }

    /// <summary>Unhandled exceptions from handlers end the VM through this callback.</summary>
    public Action<Exception>? OnError { get; set; }

    /// <exception cref="NativeException">epoll_ctl failed.</exception>
    public void Add(int fd, uint events, IEventHandler handler)
    {
        var ev = new Libc.EpollEvent { events = events, data = (ulong)fd };
        lock (_handlersLock)
        {
            if (Libc.epoll_ctl(_epoll.Fd, Libc.EPOLL_CTL_ADD, fd, &ev) != 0)
                Libc.ThrowNative("epoll_ctl(ADD)", Libc.LastErrno);
            _handlers[fd] = handler;
        }
    }

    /// <summary>Stops watching <paramref name="fd"/> (before it is closed).</summary>
    public void Remove(int fd)
    {
        lock (_handlersLock)
        {
            Libc.epoll_ctl(_epoll.Fd, Libc.EPOLL_CTL_DEL, fd, null);
            _handlers.Remove(fd);
        }
    }

    public void Start() => _thread.Start();

    private void Loop()
    {
        var events = stackalloc Libc.EpollEvent[MaxEvents];
        while (!_stopping)
        {
            int n = Libc.epoll_wait(_epoll.Fd, events, MaxEvents, -1);
            if (n < 0)
            {
                if (Libc.LastErrno == Libc.EINTR)
                    continue;
                OnError?.Invoke(new NativeException("epoll_wait", Libc.LastErrno));
                return;
            }
            for (int i = 0; i < n; i++)
            {
                int fd = (int)events[i].data;
                if (fd == _wake.Fd)
                    continue;
                try
                {
                    IEventHandler? h;
                    lock (_handlersLock)
                        _handlers.TryGetValue(fd, out h);
                    h?.Process(fd, events[i].events);
                }
#pragma warning disable CA1031 // a device back end failing must end the VM, not kill the process
                catch (Exception e)
#pragma warning restore CA1031
                {
                    OnError?.Invoke(e);
                    return;
                }
            }
        }
    }

    public void Dispose()
    {
        _stopping = true;
        Libc.EventFdWrite(_wake.Fd);
        if (_thread.IsAlive)
            _thread.Join();
        _epoll.Dispose();
        _wake.Dispose();
    }
}
