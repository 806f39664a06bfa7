using KvmSharp.Interop;
using Xunit;

namespace KvmSharp.Vmm.Tests;

/// <summary>The I/O thread on real eventfds: dispatch, the re-run list, retries, removal, errors.</summary>
public sealed class EventLoopTests : IDisposable
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);
    private readonly EventLoop _loop = new();
    private readonly List<FileDescriptor> _fds = [];

    public void Dispose()
    {
        _loop.Dispose();
        foreach (var fd in _fds)
            fd.Dispose();
    }

    private int NewEventFd()
    {
        var fd = Libc.EventFd();
        _fds.Add(fd);
        return fd.Fd;
    }

    private sealed class Handler(Func<uint, EventResult> body) : IEventHandler
    {
        public EventResult Process(uint events) => body(events);
    }

    [Fact]
    public void ReadyFd_CallsItsHandler_WithTheEpollMask()
    {
        int fd = NewEventFd();
        using var called = new ManualResetEventSlim();
        uint seen = 0;
        _loop.Add(fd, Libc.EPOLLIN, new Handler(e =>
        {
            Libc.EventFdRead(fd);
            seen = e;
            called.Set();
            return EventResult.Done;
        }));
        _loop.Start();
        Libc.EventFdWrite(fd);
        Assert.True(called.Wait(Wait, TestContext.Current.CancellationToken));
        Assert.Equal(Libc.EPOLLIN, seen & Libc.EPOLLIN);
    }

    [Fact]
    public void MoreWork_IsCalledAgainAfterOtherReadyEvents_NotSpunOn()
    {
        // A busy source (a TAP whose budget ran out) must not starve a quiet one (a console kick).
        int busyFd = NewEventFd();
        int quietFd = NewEventFd();
        const int BusyRounds = 1000;
        int busyCalls = 0;
        int busyCallsWhenQuietRan = -1;
        int rerunsWithEvents = 0;
        using var done = new ManualResetEventSlim();
        _loop.Add(busyFd, Libc.EPOLLIN, new Handler(e =>
        {
            if (e != 0)
            {
                Libc.EventFdRead(busyFd);
                Libc.EventFdWrite(quietFd); // the quiet source becomes ready during the busy one's work
            }
            else if (busyCalls == 0)
            {
                rerunsWithEvents++;
            }
            if (++busyCalls == BusyRounds)
            {
                done.Set();
                return EventResult.Done;
            }
            return EventResult.MoreWork;
        }));
        _loop.Add(quietFd, Libc.EPOLLIN, new Handler(_ =>
        {
            Libc.EventFdRead(quietFd);
            busyCallsWhenQuietRan = Volatile.Read(ref busyCalls);
            return EventResult.Done;
        }));
        _loop.Start();
        Libc.EventFdWrite(busyFd);
        Assert.True(done.Wait(Wait, TestContext.Current.CancellationToken));
        Assert.InRange(busyCallsWhenQuietRan, 1, 2);
        Assert.Equal(0, rerunsWithEvents);
    }

    [Fact]
    public void MoreWork_FromTwoCallsInOneRound_QueuesTheSourceOnce()
    {
        int fd = NewEventFd();
        int calls = 0;
        using var done = new ManualResetEventSlim();
        _loop.Add(fd, Libc.EPOLLIN, new Handler(e =>
        {
            Libc.EventFdRead(fd);
            int n = Interlocked.Increment(ref calls);
            if (n < 5)
                Libc.EventFdWrite(fd); // an event and a re-run in the same round
            if (n == 20)
                done.Set();
            return n < 20 ? EventResult.MoreWork : EventResult.Done;
        }));
        _loop.Start();
        Libc.EventFdWrite(fd);
        Assert.True(done.Wait(Wait, TestContext.Current.CancellationToken));
        Thread.Sleep(50);
        Assert.Equal(20, Volatile.Read(ref calls)); // Done ends the re-runs: no duplicate left queued
    }

    [Fact]
    public void Later_IsCalledAgainAfterTheRetryDelay()
    {
        int fd = NewEventFd();
        var times = new List<(long Ms, uint Events)>();
        using var done = new ManualResetEventSlim();
        _loop.Add(fd, Libc.EPOLLIN, new Handler(e =>
        {
            Libc.EventFdRead(fd);
            lock (times)
                times.Add((Environment.TickCount64, e));
            if (times.Count < 3)
                return EventResult.Later;
            done.Set();
            return EventResult.Done;
        }));
        _loop.Start();
        Libc.EventFdWrite(fd);
        Assert.True(done.Wait(Wait, TestContext.Current.CancellationToken));
        Assert.Equal(Libc.EPOLLIN, times[0].Events & Libc.EPOLLIN);
        Assert.Equal(0u, times[1].Events);
        Assert.True(times[2].Ms - times[0].Ms >= 2 * EventLoop.RetryDelayMilliseconds - 2);
    }

    [Fact]
    public void AddReady_CallsASourceWithoutAnFd_UntilItIsDone()
    {
        int calls = 0;
        using var done = new ManualResetEventSlim();
        _loop.Start();
        _loop.AddReady(new Handler(e =>
        {
            Assert.Equal(0u, e);
            if (Interlocked.Increment(ref calls) < 3)
                return EventResult.MoreWork;
            done.Set();
            return EventResult.Done;
        }));
        Assert.True(done.Wait(Wait, TestContext.Current.CancellationToken));
        Thread.Sleep(20);
        Assert.Equal(3, Volatile.Read(ref calls));
    }

    [Fact]
    public void Removed_Fd_IsNotCalledAgain_AndItsSlotIsReused()
    {
        int first = NewEventFd();
        int second = NewEventFd();
        int firstCalls = 0;
        using var secondCalled = new ManualResetEventSlim();
        _loop.Add(first, Libc.EPOLLIN, new Handler(_ => { Interlocked.Increment(ref firstCalls); return EventResult.Done; }));
        _loop.Remove(first);
        _loop.Add(second, Libc.EPOLLIN, new Handler(_ => { Libc.EventFdRead(second); secondCalled.Set(); return EventResult.Done; }));
        _loop.Start();
        Libc.EventFdWrite(first);
        Libc.EventFdWrite(second);
        Assert.True(secondCalled.Wait(Wait, TestContext.Current.CancellationToken));
        Assert.Equal(0, Volatile.Read(ref firstCalls));
    }

    [Fact]
    public void Modify_ToNoEvents_SilencesTheFd()
    {
        int fd = NewEventFd();
        int calls = 0;
        _loop.Add(fd, Libc.EPOLLIN, new Handler(_ => { Interlocked.Increment(ref calls); return EventResult.Done; }));
        _loop.Modify(fd, 0);
        _loop.Start();
        Libc.EventFdWrite(fd); // level-triggered and never read: would be reported again and again
        Thread.Sleep(50);
        Assert.Equal(0, Volatile.Read(ref calls));
    }

    [Fact]
    public void HandlerException_EndsTheLoopThroughOnError()
    {
        int fd = NewEventFd();
        Exception? seen = null;
        using var failed = new ManualResetEventSlim();
        _loop.OnError = e => { seen = e; failed.Set(); };
        _loop.Add(fd, Libc.EPOLLIN, new Handler(_ => throw new IOException("back end gone")));
        _loop.Start();
        Libc.EventFdWrite(fd);
        Assert.True(failed.Wait(Wait, TestContext.Current.CancellationToken));
        Assert.IsType<IOException>(seen);
    }

    [Fact]
    public void AfterDispose_RemoveIsHarmless_AndAddThrows()
    {
        int fd = NewEventFd();
        var loop = new EventLoop();
        loop.Add(fd, Libc.EPOLLIN, new Handler(_ => EventResult.Done));
        loop.Dispose();
        loop.Remove(fd); // an owner disposed after the loop
        Assert.Throws<ObjectDisposedException>(() => loop.Add(fd, Libc.EPOLLIN, new Handler(_ => EventResult.Done)));
    }
}
