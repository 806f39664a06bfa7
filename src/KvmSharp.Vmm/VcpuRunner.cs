using KvmSharp.Interop;
using KvmSharp.Kvm;
using KvmSharp.Kvm.Native;
using KvmSharp.Vmm.Diagnostics;
using KvmSharp.Vmm.Pvm;
using static KvmSharp.Kvm.Native.KvmConstants;

namespace KvmSharp.Vmm;

/// <summary>
/// One vCPU's thread: KVM_RUN, dispatch the exit synchronously to the PIO or MMIO bus, re-enter
/// (style.md §6). Nothing on the exit path allocates. A stop or pause request sets
/// <c>immediate_exit</c> and signals the thread, so KVM_RUN returns EINTR and the loop sees the
/// request; a pause parks the thread in <see cref="VmLifecycle.Park"/> until resumed or stopped.
/// The runner sees its VM only through a <see cref="VcpuContext"/>.
/// </summary>
internal sealed unsafe class VcpuRunner
{
    private readonly VcpuContext _vm;
    private readonly KvmVcpu _vcpu;
    private readonly PvmCompat? _pvm;
    private readonly Thread _thread;
    private volatile int _tid;

    public VcpuRunner(VcpuContext vm, KvmVcpu vcpu, PvmCompat? pvm)
    {
        _vm = vm;
        _vcpu = vcpu;
        _pvm = pvm;
        _thread = new Thread(Loop, maxStackSize: 256 * 1024) { Name = $"vcpu{vcpu.Id}", IsBackground = true };
    }

    public KvmVcpu Vcpu => _vcpu;
    public long Exits { get; private set; }
    public PvmCompat? Pvm => _pvm;

    public void Start() => _thread.Start();

    public void Join() => _thread.Join();

    /// <summary>Makes KVM_RUN return (or not start): immediate_exit, then SIGUSR2 to the thread (api.rst: KVM_RUN, immediate_exit).</summary>
    public void Kick()
    {
        Volatile.Write(ref _vcpu.RunData.immediate_exit, 1);
        int tid = _tid;
        if (tid != 0)
            Libc.tgkill(Libc.getpid(), tid, Libc.SIGUSR2);
    }

    private void Loop()
    {
        _tid = Libc.gettid();
        try
        {
            RunUntilStopped();
        }
        catch (Exception e) when (e is NativeException or KvmSharp.Memory.GuestMemoryException)
        {
            _vm.RequestStop(VmExit.Of(VmExitKind.VmmError, $"vcpu{_vcpu.Id}: {e.Message}"));
        }
        finally
        {
            _tid = 0;
            _vm.Lifecycle.VcpuExited();
        }
    }

    private void RunUntilStopped()
    {
        ref kvm_run run = ref _vcpu.RunData;
        var lifecycle = _vm.Lifecycle;
        while (!lifecycle.StopRequested)
        {
            if (lifecycle.PauseRequested)
            {
                lifecycle.Park(); // out of KVM_RUN: the vCPU's state is in KVM, nothing to save here
                continue;
            }
            int rc = _vcpu.Run();
            if (rc < 0)
            {
                if (rc is -Libc.EINTR or -Libc.EAGAIN)
                {
                    Volatile.Write(ref run.immediate_exit, 0);
                    if (_pvm is not null && _vcpu.Id == 0 && !_vm.StopRequested)
                        _pvm.Poll();
                    continue;
                }
                _vm.RequestStop(VmExit.Of(VmExitKind.VmmError, $"vcpu{_vcpu.Id}: KVM_RUN failed: {Libc.StrError(-rc)}"));
                return;
            }
            Exits++;
            switch (run.exit_reason)
            {
                case KVM_EXIT_IO:
                    HandleIo(ref run);
                    break;
                case KVM_EXIT_MMIO:
                    HandleMmio(ref run);
                    break;
                case KVM_EXIT_INTR:
                    Volatile.Write(ref run.immediate_exit, 0);
                    break;
                case KVM_EXIT_HLT:
                    _vm.RequestStop(VmExit.Of(VmExitKind.GuestPowerOff, $"vcpu{_vcpu.Id} halted"));
                    return;
                case KVM_EXIT_SHUTDOWN:
                    _vm.RequestStop(VmExit.Of(VmExitKind.TripleFault, $"vcpu{_vcpu.Id}: triple fault (KVM_EXIT_SHUTDOWN)\n" + RegisterDump.Format(_vcpu, _vm.Memory)));
                    return;
                case KVM_EXIT_SYSTEM_EVENT:
                    HandleSystemEvent(ref run);
                    return;
                case KVM_EXIT_INTERNAL_ERROR:
                    if (run.internal_suberror == KVM_INTERNAL_ERROR_EMULATION && _pvm is not null && _pvm.TryHandleEmulationFailure(ref run))
                        break;
                    _vm.RequestStop(VmExit.Of(VmExitKind.InternalError, DescribeInternalError(ref run)));
                    return;
                case KVM_EXIT_FAIL_ENTRY:
                    _vm.RequestStop(VmExit.Of(VmExitKind.InternalError,
                        $"vcpu{_vcpu.Id}: KVM_EXIT_FAIL_ENTRY, hardware reason 0x{run.fail_entry_hardware_entry_failure_reason:x} on host cpu {run.fail_entry_cpu}\n" + RegisterDump.Format(_vcpu, _vm.Memory)));
                    return;
                case KVM_EXIT_DEBUG:
                    break;
                default:
                    _vm.RequestStop(VmExit.Of(VmExitKind.InternalError, $"vcpu{_vcpu.Id}: unexpected exit reason {run.exit_reason}\n" + RegisterDump.Format(_vcpu, _vm.Memory)));
                    return;
            }
        }
    }

    private void HandleIo(ref kvm_run run)
    {
        int size = run.io_size;
        uint count = run.io_count;
        ulong offset = run.io_data_offset;
        // The data area lies inside the kvm_run mapping; check before touching it (a KVM bug must not become ours).
        ulong total = (ulong)size * count;
        if (size is not (1 or 2 or 4) || offset > (ulong)_vcpu.RunSize || total > (ulong)_vcpu.RunSize - offset)
        {
            _vm.RequestStop(VmExit.Of(VmExitKind.InternalError, $"vcpu{_vcpu.Id}: malformed KVM_EXIT_IO (size {size}, count {count}, offset {offset})"));
            return;
        }
        byte* data = _vcpu.RunBase + offset;
        ushort port = run.io_port;
        for (uint i = 0; i < count; i++)
        {
            var span = new Span<byte>(data + i * (uint)size, size);
            if (run.io_direction == KVM_EXIT_IO_OUT)
            {
                if (!_vm.PioBus.TryWrite(port, span))
                    _vm.LogUnclaimed("port write", port);
            }
            else if (!_vm.PioBus.TryRead(port, span))
            {
                span.Fill(0xFF);
                _vm.LogUnclaimed("port read", port);
            }
        }
    }

    private void HandleMmio(ref kvm_run run)
    {
        uint len = run.mmio_len;
        if (len is 0 or > 8)
        {
            _vm.RequestStop(VmExit.Of(VmExitKind.InternalError, $"vcpu{_vcpu.Id}: malformed KVM_EXIT_MMIO (len {len})"));
            return;
        }
        fixed (byte* p = run.mmio_data)
        {
            var span = new Span<byte>(p, (int)len);
            if (run.mmio_is_write != 0)
            {
                if (!_vm.MmioBus.TryWrite(run.mmio_phys_addr, span))
                    _vm.LogUnclaimed("mmio write", run.mmio_phys_addr);
            }
            else if (!_vm.MmioBus.TryRead(run.mmio_phys_addr, span))
            {
                span.Fill(0xFF);
                _vm.LogUnclaimed("mmio read", run.mmio_phys_addr);
            }
        }
    }

    private void HandleSystemEvent(ref kvm_run run)
    {
        var exit = run.system_event_type switch
        {
            KVM_SYSTEM_EVENT_SHUTDOWN => VmExit.Of(VmExitKind.GuestPowerOff, "guest powered off"),
            KVM_SYSTEM_EVENT_RESET => VmExit.Of(VmExitKind.GuestReboot, "guest reset"),
            KVM_SYSTEM_EVENT_CRASH => VmExit.Of(VmExitKind.GuestPanic, "guest crashed (KVM_SYSTEM_EVENT_CRASH)"),
            _ => VmExit.Of(VmExitKind.InternalError, $"unknown system event {run.system_event_type}"),
        };
        _vm.RequestStop(exit);
    }

    private string DescribeInternalError(ref kvm_run run)
    {
        string what = run.internal_suberror switch
        {
            KVM_INTERNAL_ERROR_EMULATION => "the host could not emulate an instruction",
            KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "exception while delivering an event",
            _ => $"suberror {run.internal_suberror}",
        };
        ReadOnlySpan<byte> insn = default;
        if (run.internal_suberror == KVM_INTERNAL_ERROR_EMULATION
            && (run.emulation_failure_flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
            && run.internal_ndata >= 3)
        {
            fixed (byte* p = run.emulation_failure_insn_bytes)
                insn = new ReadOnlySpan<byte>(p, Math.Min((int)run.emulation_failure_insn_size, 15)).ToArray();
        }
        return $"vcpu{_vcpu.Id}: KVM_EXIT_INTERNAL_ERROR: {what}\n" + RegisterDump.Format(_vcpu, _vm.Memory, insn);
    }
}
