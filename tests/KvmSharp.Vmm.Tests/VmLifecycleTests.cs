using Xunit;

namespace KvmSharp.Vmm.Tests;

/// <summary>The lifecycle state machine with simulated vCPU threads (no KVM): each "runs" by spinning on the flags as VcpuRunner does between KVM_RUN calls.</summary>
public sealed class VmLifecycleTests
{
    private static readonly VmExit Quit = VmExit.Of(VmExitKind.UserQuit, "test");

    /// <summary>Threads that loop like VcpuRunner: stop → exit, pause → Park, else "KVM_RUN" (a short sleep, which a kick would cut short).</summary>
    private sealed class FakeVcpus : IDisposable
    {
        private readonly List<Thread> _threads = [];
        public long Iterations;
        public int Kicks;

        public VmLifecycle Lifecycle { get; }

        public FakeVcpus() => Lifecycle = new VmLifecycle(() => Interlocked.Increment(ref Kicks));

        public void Start(int n)
        {
            Lifecycle.Configured();
            Assert.True(Lifecycle.Start(n));
            for (int i = 0; i < n; i++)
            {
                var t = new Thread(() =>
                {
                    try
                    {
                        while (!Lifecycle.StopRequested)
                        {
                            if (Lifecycle.PauseRequested)
                            {
                                Lifecycle.Park();
                                continue;
                            }
                            Interlocked.Increment(ref Iterations);
                            Thread.Sleep(1);
                        }
                    }
                    finally
                    {
                        Lifecycle.VcpuExited();
                    }
                }) { IsBackground = true };
                _threads.Add(t);
                t.Start();
            }
        }

        public void Join()
        {
            foreach (var t in _threads)
                Assert.True(t.Join(TimeSpan.FromSeconds(10)));
        }

        public void Dispose() => Lifecycle.Dispose();
    }

    [Fact]
    public void GoesCreatedConfiguredRunningPausedRunningStopped()
    {
        using var v = new FakeVcpus();
        Assert.Equal(VmState.Created, v.Lifecycle.State);
        v.Start(3);
        Assert.Equal(VmState.Running, v.Lifecycle.State);
        v.Lifecycle.Pause();
        Assert.Equal(VmState.Paused, v.Lifecycle.State);
        Assert.True(v.Kicks >= 1);
        v.Lifecycle.Resume();
        Assert.Equal(VmState.Running, v.Lifecycle.State);
        Assert.True(v.Lifecycle.RequestStop(Quit));
        v.Join();
        Assert.Equal(VmState.Stopped, v.Lifecycle.State);
        Assert.Equal(VmExitKind.UserQuit, v.Lifecycle.Exit.Kind);
    }

    [Fact]
    public void PausedVcpusDoNotRunUntilResumed()
    {
        using var v = new FakeVcpus();
        v.Start(2);
        Thread.Sleep(20);
        v.Lifecycle.Pause();
        long before = Interlocked.Read(ref v.Iterations);
        Thread.Sleep(100);
        Assert.Equal(before, Interlocked.Read(ref v.Iterations));
        v.Lifecycle.Resume();
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (Interlocked.Read(ref v.Iterations) == before && DateTime.UtcNow < deadline)
            Thread.Sleep(1);
        Assert.True(Interlocked.Read(ref v.Iterations) > before);
        v.Lifecycle.RequestStop(Quit);
        v.Join();
    }

    [Fact]
    public void StopWhilePausedReleasesTheParkedThreads()
    {
        using var v = new FakeVcpus();
        v.Start(2);
        v.Lifecycle.Pause();
        v.Lifecycle.RequestStop(Quit);
        v.Join();
        Assert.Equal(VmState.Stopped, v.Lifecycle.State);
        Assert.Throws<InvalidOperationException>(v.Lifecycle.Resume);
        Assert.Throws<InvalidOperationException>(v.Lifecycle.Pause);
    }

    [Fact]
    public void StopBeforeRunMeansNoThreadStarts()
    {
        using var l = new VmLifecycle(() => { });
        l.Configured();
        Assert.True(l.RequestStop(Quit));
        Assert.False(l.RequestStop(VmExit.Of(VmExitKind.Signal, "second")));
        Assert.False(l.Start(1));
        Assert.Equal(VmState.Stopped, l.State);
        Assert.Equal(VmExitKind.UserQuit, l.Exit.Kind);
        l.WaitForStop(); // already set: returns
    }

    [Fact]
    public void InvalidTransitionsThrow()
    {
        using var l = new VmLifecycle(() => { });
        Assert.Throws<InvalidOperationException>(l.Pause);
        Assert.Throws<InvalidOperationException>(l.Resume);
        Assert.Throws<InvalidOperationException>(() => l.Start(1)); // not configured
        l.Configured();
        Assert.Throws<InvalidOperationException>(l.Configured);
        Assert.Throws<InvalidOperationException>(l.Pause);
    }

    [Fact]
    public void PauseDoesNotWaitForVcpusThatAlreadyExited()
    {
        using var v = new FakeVcpus();
        v.Lifecycle.Configured();
        Assert.True(v.Lifecycle.Start(2));
        v.Lifecycle.VcpuExited(); // one thread ended on its own (say, an error path that did not stop the VM)
        var parker = new Thread(() =>
        {
            while (!v.Lifecycle.PauseRequested)
                Thread.Sleep(1);
            v.Lifecycle.Park();
            v.Lifecycle.VcpuExited();
        });
        parker.Start();
        v.Lifecycle.Pause(); // returns once the one live thread parked
        Assert.Equal(VmState.Paused, v.Lifecycle.State);
        v.Lifecycle.RequestStop(Quit);
        Assert.True(parker.Join(TimeSpan.FromSeconds(10)));
    }
}
