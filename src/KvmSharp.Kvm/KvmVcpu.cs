using KvmSharp.Interop;
using KvmSharp.Kvm.Native;
using static KvmSharp.Kvm.Native.KvmIoctls;

namespace KvmSharp.Kvm;

/// <summary>A vCPU file descriptor and its mapped <c>kvm_run</c> page: one typed method per ioctl.</summary>
public sealed unsafe class KvmVcpu : IDisposable
{
    private readonly FileDescriptor _fd;
    private readonly kvm_run* _run;
    private readonly int _runSize;
    private readonly int _rawFd;
    private bool _disposed;

    internal KvmVcpu(int id, FileDescriptor fd, kvm_run* run, int runSize)
    {
        Id = id;
        _fd = fd;
        _run = run;
        _runSize = runSize;
        // The vCPU thread uses the raw fd for every KVM_RUN; the handle stays referenced until Dispose.
        bool added = false;
        _fd.DangerousAddRef(ref added);
        _rawFd = _fd.Fd;
    }

    public int Id { get; }

    /// <summary>The shared kvm_run page. Valid until Dispose; read it on the vCPU thread only.</summary>
    // SAFETY: _run maps KVM_GET_VCPU_MMAP_SIZE bytes (>= sizeof(kvm_run), layout tests) until Dispose.
    public ref kvm_run RunData => ref *_run;

    /// <summary>Base of the kvm_run mapping (PIO data lives at <c>io_data_offset</c> inside it).</summary>
    public byte* RunBase => (byte*)_run;

    /// <summary>Size of the kvm_run mapping.</summary>
    public int RunSize => _runSize;

    /// <summary>KVM_RUN. Returns 0, or -errno (EINTR when kicked by a signal or immediate_exit). Never throws.</summary>
    public int Run()
    {
        int r = Libc.ioctl(_rawFd, KVM_RUN, 0);
        return r < 0 ? -Libc.LastErrno : 0;
    }

    public void GetRegisters(out kvm_regs regs)
    {
        // SAFETY: p pins regs, a kvm_regs of the size the request number encodes (layout tests), for this call only.
        fixed (kvm_regs* p = &regs)
        {
            if (Libc.ioctl(_rawFd, KVM_GET_REGS, p) < 0)
                KvmException.Throw("KVM_GET_REGS");
        }
    }

    public void SetRegisters(in kvm_regs regs)
    {
        // SAFETY: p pins regs, a kvm_regs of the size the request number encodes (layout tests), for this call only.
        fixed (kvm_regs* p = &regs)
        {
            if (Libc.ioctl(_rawFd, KVM_SET_REGS, p) < 0)
                KvmException.Throw("KVM_SET_REGS");
        }
    }

    public void GetSpecialRegisters(out kvm_sregs sregs)
    {
        // SAFETY: p pins sregs, a kvm_sregs of the size the request number encodes (layout tests), for this call only.
        fixed (kvm_sregs* p = &sregs)
        {
            if (Libc.ioctl(_rawFd, KVM_GET_SREGS, p) < 0)
                KvmException.Throw("KVM_GET_SREGS");
        }
    }

    public void SetSpecialRegisters(in kvm_sregs sregs)
    {
        // SAFETY: p pins sregs, a kvm_sregs of the size the request number encodes (layout tests), for this call only.
        fixed (kvm_sregs* p = &sregs)
        {
            if (Libc.ioctl(_rawFd, KVM_SET_SREGS, p) < 0)
                KvmException.Throw("KVM_SET_SREGS");
        }
    }

    /// <summary>KVM_SET_CPUID2: the CPUID table this vCPU reports.</summary>
    public void SetCpuid(ReadOnlySpan<kvm_cpuid_entry2> entries)
    {
        int size = 8 + entries.Length * sizeof(kvm_cpuid_entry2);
        byte[] buf = new byte[size];
        // SAFETY: buf is the 8-byte header plus exactly the entries the header's count announces; KVM reads no further.
        fixed (byte* p = buf)
        {
            *(uint*)p = (uint)entries.Length;
            entries.CopyTo(new Span<kvm_cpuid_entry2>(p + 8, entries.Length));
            if (Libc.ioctl(_rawFd, KVM_SET_CPUID2, p) < 0)
                KvmException.Throw("KVM_SET_CPUID2");
        }
    }

    /// <summary>KVM_SET_MSRS. Returns how many entries KVM accepted (it stops at the first it refuses).</summary>
    public int SetMsrs(ReadOnlySpan<kvm_msr_entry> entries)
    {
        int size = 8 + entries.Length * sizeof(kvm_msr_entry);
        // SAFETY: p is the 8-byte header plus exactly the entries the header's count announces; KVM reads (and for GET fills) no further.
        byte* p = stackalloc byte[size];
        *(uint*)p = (uint)entries.Length;
        *(uint*)(p + 4) = 0;
        entries.CopyTo(new Span<kvm_msr_entry>(p + 8, entries.Length));
        int r = Libc.ioctl(_rawFd, KVM_SET_MSRS, p);
        if (r < 0)
            KvmException.Throw("KVM_SET_MSRS");
        return r;
    }

    /// <summary>KVM_GET_MSRS for the indices in <paramref name="entries"/>; fills their data. Returns how many were read.</summary>
    public int GetMsrs(Span<kvm_msr_entry> entries)
    {
        int size = 8 + entries.Length * sizeof(kvm_msr_entry);
        // SAFETY: p is the 8-byte header plus exactly the entries the header's count announces; KVM reads (and for GET fills) no further.
        byte* p = stackalloc byte[size];
        *(uint*)p = (uint)entries.Length;
        *(uint*)(p + 4) = 0;
        entries.CopyTo(new Span<kvm_msr_entry>(p + 8, entries.Length));
        int r = Libc.ioctl(_rawFd, KVM_GET_MSRS, p);
        if (r < 0)
            KvmException.Throw("KVM_GET_MSRS");
        new Span<kvm_msr_entry>(p + 8, entries.Length).CopyTo(entries);
        return r;
    }

    public void GetLapic(out kvm_lapic_state state)
    {
        // SAFETY: p pins state, a kvm_lapic_state of the size the request number encodes (layout tests), for this call only.
        fixed (kvm_lapic_state* p = &state)
        {
            if (Libc.ioctl(_rawFd, KVM_GET_LAPIC, p) < 0)
                KvmException.Throw("KVM_GET_LAPIC");
        }
    }

    public void SetLapic(in kvm_lapic_state state)
    {
        // SAFETY: p pins state, a kvm_lapic_state of the size the request number encodes (layout tests), for this call only.
        fixed (kvm_lapic_state* p = &state)
        {
            if (Libc.ioctl(_rawFd, KVM_SET_LAPIC, p) < 0)
                KvmException.Throw("KVM_SET_LAPIC");
        }
    }

    public void GetVcpuEvents(out kvm_vcpu_events events)
    {
        // SAFETY: p pins events, a kvm_vcpu_events of the size the request number encodes (layout tests), for this call only.
        fixed (kvm_vcpu_events* p = &events)
        {
            if (Libc.ioctl(_rawFd, KVM_GET_VCPU_EVENTS, p) < 0)
                KvmException.Throw("KVM_GET_VCPU_EVENTS");
        }
    }

    public void SetVcpuEvents(in kvm_vcpu_events events)
    {
        // SAFETY: p pins events, a kvm_vcpu_events of the size the request number encodes (layout tests), for this call only.
        fixed (kvm_vcpu_events* p = &events)
        {
            if (Libc.ioctl(_rawFd, KVM_SET_VCPU_EVENTS, p) < 0)
                KvmException.Throw("KVM_SET_VCPU_EVENTS");
        }
    }

    public void SetGuestDebug(in kvm_guest_debug debug)
    {
        // SAFETY: p pins debug, a kvm_guest_debug of the size the request number encodes (layout tests), for this call only.
        fixed (kvm_guest_debug* p = &debug)
        {
            if (Libc.ioctl(_rawFd, KVM_SET_GUEST_DEBUG, p) < 0)
                KvmException.Throw("KVM_SET_GUEST_DEBUG");
        }
    }

    public uint GetMpState()
    {
        kvm_mp_state s;
        // SAFETY: &s is a local of the size KVM_GET_MP_STATE encodes (layout tests); KVM uses it during the call only.
        if (Libc.ioctl(_rawFd, KVM_GET_MP_STATE, &s) < 0)
            KvmException.Throw("KVM_GET_MP_STATE");
        return s.mp_state;
    }

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        // SAFETY: once only (_disposed); the owner has stopped the vCPU thread, the only reader of RunData.
        Libc.munmap(_run, (nuint)_runSize);
        _fd.DangerousRelease();
        _fd.Dispose();
    }
}
