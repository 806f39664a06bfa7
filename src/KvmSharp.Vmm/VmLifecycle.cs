namespace KvmSharp.Vmm;

/// <summary>
/// The VM's state machine (<see cref="VmState"/>) and the rendezvous of its vCPU threads: a stop
/// request (first one wins, from any state), and pause/resume. Pausing sets a flag and kicks every
/// vCPU (immediate_exit plus SIGUSR2), and returns once each running vCPU thread has parked in
/// <see cref="Park"/>, where it blocks on a monitor and uses no CPU until resumed or stopped
/// (firecracker vstate/vcpu.rs: running()/paused() fed by a mailbox checked on every KVM_RUN return).
/// </summary>
/// <remarks>
/// <para>The I/O thread is not paused: it finishes requests already in flight (writing used rings
/// and raising irqfds, which KVM keeps pending until the vCPUs run again), and a paused guest
/// cannot kick new ones, so it sleeps in epoll_wait. Stopping it would add a second rendezvous for
/// nothing until device state is saved (snapshots will quiesce the devices then).</para>
/// <para>Threads: <see cref="Pause"/>, <see cref="Resume"/> and <see cref="RequestStop"/> from any
/// thread (API, signal handler, a vCPU); <see cref="Park"/> and <see cref="VcpuExited"/> from vCPU
/// threads. One monitor, <c>_gate</c>, guards the state and the counters; the flags vCPUs test on
/// every exit are volatile so that test takes no lock.</para>
/// </remarks>
internal sealed class VmLifecycle : IDisposable
{
    private readonly object _gate = new();
    private readonly Action _kickAll;
    private readonly ManualResetEventSlim _stopped = new();
    private VmState _state = VmState.Created;
    private volatile bool _stopRequested;
    private volatile bool _pauseRequested;
    private int _running; // vCPU threads started and not exited
    private int _parked;
    private VmExit _exit;

    /// <param name="kickAll">Makes every vCPU thread leave (or not enter) KVM_RUN.</param>
    public VmLifecycle(Action kickAll) => _kickAll = kickAll;

    public VmState State
    {
        get
        {
            lock (_gate)
                return _state;
        }
    }

    /// <summary>Tested by vCPU threads on every KVM_RUN return: no lock.</summary>
    public bool StopRequested => _stopRequested;

    /// <summary>Tested by vCPU threads before every KVM_RUN: no lock.</summary>
    public bool PauseRequested => _pauseRequested;

    /// <summary>Why the VM stopped (valid once <see cref="WaitForStop"/> returned).</summary>
    public VmExit Exit
    {
        get
        {
            lock (_gate)
                return _exit;
        }
    }

    /// <summary>Created → Configured: the VM is built.</summary>
    /// <exception cref="InvalidOperationException">Not in <see cref="VmState.Created"/> (a stop is not an error: the state stays Stopped).</exception>
    public void Configured() => Transition(VmState.Created, VmState.Configured);

    /// <summary>Configured → Running: <paramref name="vcpuThreads"/> threads are about to start.</summary>
    /// <returns>False when the VM was stopped before it ran (start no thread).</returns>
    /// <exception cref="InvalidOperationException">Not configured, or already ran.</exception>
    public bool Start(int vcpuThreads)
    {
        lock (_gate)
        {
            if (_state == VmState.Stopped)
                return false;
            if (_state != VmState.Configured)
                throw new InvalidOperationException($"The VM cannot start from state {_state}.");
            _running = vcpuThreads;
            _state = VmState.Running;
            return true;
        }
    }

    /// <summary>
    /// Running → Paused: every vCPU thread leaves KVM_RUN and parks. Returns when all have parked,
    /// or when the VM stops meanwhile (then the state is Stopped).
    /// </summary>
    /// <exception cref="InvalidOperationException">The VM is not running (pausing a paused VM is allowed and does nothing).</exception>
    public void Pause()
    {
        lock (_gate)
        {
            if (_state == VmState.Paused)
                return;
            if (_state != VmState.Running)
                throw new InvalidOperationException($"The VM cannot pause from state {_state}.");
            _pauseRequested = true;
        }
        _kickAll();
        lock (_gate)
        {
            while (_parked < _running && !_stopRequested)
                Monitor.Wait(_gate);
            if (!_stopRequested)
                _state = VmState.Paused;
        }
    }

    /// <summary>Paused → Running: the parked vCPU threads re-enter KVM_RUN.</summary>
    /// <exception cref="InvalidOperationException">The VM is not paused (resuming a running VM is allowed and does nothing).</exception>
    public void Resume()
    {
        lock (_gate)
        {
            if (_state == VmState.Running)
                return;
            if (_state != VmState.Paused)
                throw new InvalidOperationException($"The VM cannot resume from state {_state}.");
            _pauseRequested = false;
            _state = VmState.Running;
            Monitor.PulseAll(_gate);
        }
    }

    /// <summary>Ends the VM with <paramref name="exit"/>, from any state; the first request wins. Safe from any thread.</summary>
    /// <returns>True for the request that won.</returns>
    public bool RequestStop(VmExit exit)
    {
        lock (_gate)
        {
            if (_stopRequested)
                return false;
            _exit = exit;
            _stopRequested = true;
            _state = VmState.Stopped;
            Monitor.PulseAll(_gate); // parked vCPUs and a waiting Pause
        }
        _kickAll();
        _stopped.Set();
        return true;
    }

    /// <summary>Blocks until a stop is requested.</summary>
    public void WaitForStop() => _stopped.Wait(CancellationToken.None);

    /// <summary>
    /// Called by a vCPU thread that saw <see cref="PauseRequested"/>: blocks without using CPU until
    /// the VM is resumed or stopped.
    /// </summary>
    public void Park()
    {
        lock (_gate)
        {
            _parked++;
            Monitor.PulseAll(_gate); // Pause counts parked threads
            while (_pauseRequested && !_stopRequested)
                Monitor.Wait(_gate);
            _parked--;
        }
    }

    /// <summary>Called once by each vCPU thread as it ends, so a pause does not wait for it.</summary>
    public void VcpuExited()
    {
        lock (_gate)
        {
            _running--;
            Monitor.PulseAll(_gate);
        }
    }

    public void Dispose() => _stopped.Dispose();

    private void Transition(VmState from, VmState to)
    {
        lock (_gate)
        {
            if (_state == VmState.Stopped)
                return;
            if (_state != from)
                throw new InvalidOperationException($"The VM cannot go from {_state} to {to}.");
            _state = to;
        }
    }
}
