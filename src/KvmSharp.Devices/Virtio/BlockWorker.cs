namespace KvmSharp.Devices.Virtio;

/// <summary>
/// The thread that serves a disk's queues (Cloud Hypervisor's per-device epoll thread; style.md
/// §6), so disk I/O and fsync never run on the VMM's I/O thread, which also serves the network
/// and the console. The I/O thread only marks a queue pending and wakes the worker.
/// </summary>
/// <remarks>Kicks coalesce: one pending bit per queue (up to 64), so a burst of kicks is one pass.</remarks>
internal sealed class BlockWorker : IDisposable
{
    private readonly Action<int> _serve;
    private readonly Thread _thread;
    private readonly ManualResetEventSlim _wake = new();
    private long _pending;        // bit q: queue q was kicked
    private long _posted;         // kicks posted
    private long _served;         // kicks posted before the last pass began
    private volatile bool _stopping;

    /// <param name="serve">Serves one queue; runs on the worker thread.</param>
    /// <param name="name">Thread name, e.g. "blk0".</param>
    public BlockWorker(Action<int> serve, string name)
    {
        _serve = serve;
        _thread = new Thread(Run) { Name = name, IsBackground = true };
        _thread.Start();
    }

    /// <summary>Queue <paramref name="queueIndex"/> (0..63) has work: never blocks.</summary>
    public void Post(int queueIndex)
    {
        Interlocked.Or(ref _pending, 1L << queueIndex);
        Interlocked.Increment(ref _posted);
        _wake.Set();
    }

    /// <summary>Blocks until every kick posted before the call was served (pause, snapshot, tests).</summary>
    public void WaitIdle()
    {
        long target = Interlocked.Read(ref _posted);
        var spin = new SpinWait();
        while (Interlocked.Read(ref _served) < target && _thread.IsAlive)
            spin.SpinOnce(sleep1Threshold: 20);
    }

    private void Run()
    {
        while (true)
        {
            _wake.Wait();
            // Reset before taking the bits: a Post after this point sets the event again.
            _wake.Reset();
            if (_stopping)
                return;
            long posted = Interlocked.Read(ref _posted);
            long pending = Interlocked.Exchange(ref _pending, 0);
            while (pending != 0)
            {
                int q = System.Numerics.BitOperations.TrailingZeroCount(pending);
                pending &= pending - 1;
                _serve(q);
            }
            Volatile.Write(ref _served, posted);
        }
    }

    public void Dispose()
    {
        _stopping = true;
        _wake.Set();
        _thread.Join();
        _wake.Dispose();
    }
}
