using KvmSharp.Interop;
using KvmSharp.Kvm.Native;
using static KvmSharp.Kvm.Native.KvmIoctls;

namespace KvmSharp.Kvm;

/// <summary>A VM file descriptor: one typed method per VM ioctl (api.rst §4).</summary>
public sealed unsafe class KvmVm : IDisposable
{
    private readonly FileDescriptor _fd;
    private readonly int _vcpuMmapSize;

    internal KvmVm(FileDescriptor fd, int vcpuMmapSize)
    {
        _fd = fd;
        _vcpuMmapSize = vcpuMmapSize;
    }

    private int Fd => _fd.Fd;

    /// <summary>KVM_SET_USER_MEMORY_REGION. <paramref name="hostAddress"/> must stay mapped while the slot exists.</summary>
    /// <exception cref="KvmException">The ioctl failed.</exception>
    public void SetUserMemoryRegion(uint slot, ulong guestPhysAddr, ulong size, nint hostAddress, uint flags = 0)
    {
        var region = new kvm_userspace_memory_region
        {
            slot = slot,
            flags = flags,
            guest_phys_addr = guestPhysAddr,
            memory_size = size,
            userspace_addr = (ulong)hostAddress,
        };
        // SAFETY: &region is a local of the size KVM_SET_USER_MEMORY_REGION encodes (layout tests); KVM uses it
        // during the call only. The guest memory behind hostAddress is the caller's to keep mapped (see above).
        if (Libc.ioctl(Fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
            KvmException.Throw("KVM_SET_USER_MEMORY_REGION");
    }

    /// <summary>KVM_SET_TSS_ADDR: three pages Intel VMX needs below 4 GiB, outside RAM.</summary>
    public void SetTssAddress(ulong address)
    {
        if (Libc.ioctl(Fd, KVM_SET_TSS_ADDR, (nint)address) < 0)
            KvmException.Throw("KVM_SET_TSS_ADDR");
    }

    /// <summary>KVM_SET_IDENTITY_MAP_ADDR: one page Intel VMX needs for real-mode emulation.</summary>
    public void SetIdentityMapAddress(ulong address)
    {
        // SAFETY: &address is a local of the size KVM_SET_IDENTITY_MAP_ADDR encodes (layout tests); KVM uses it during the call only.
        if (Libc.ioctl(Fd, KVM_SET_IDENTITY_MAP_ADDR, &address) < 0)
            KvmException.Throw("KVM_SET_IDENTITY_MAP_ADDR");
    }

    /// <summary>KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and per-vCPU LAPICs.</summary>
    public void CreateIrqchip()
    {
        if (Libc.ioctl(Fd, KVM_CREATE_IRQCHIP, 0) < 0)
            KvmException.Throw("KVM_CREATE_IRQCHIP");
    }

    /// <summary>KVM_CREATE_PIT2 with the dummy speaker port (0x61 bit 4 handled in-kernel).</summary>
    public void CreatePit2()
    {
        var config = new kvm_pit_config { flags = KvmConstants.KVM_PIT_SPEAKER_DUMMY };
        // SAFETY: &config is a local of the size KVM_CREATE_PIT2 encodes (layout tests); KVM uses it during the call only.
        if (Libc.ioctl(Fd, KVM_CREATE_PIT2, &config) < 0)
            KvmException.Throw("KVM_CREATE_PIT2");
    }

    /// <summary>KVM_IRQ_LINE: sets a GSI's level.</summary>
    public void SetIrqLine(uint gsi, bool level)
    {
        var l = new kvm_irq_level { irq = gsi, level = level ? 1u : 0u };
        // SAFETY: &l is a local of the size KVM_IRQ_LINE encodes (layout tests); KVM uses it during the call only.
        if (Libc.ioctl(Fd, KVM_IRQ_LINE, &l) < 0)
            KvmException.Throw("KVM_IRQ_LINE");
    }

    /// <summary>KVM_IRQFD: a write to <paramref name="eventFd"/> injects an edge on <paramref name="gsi"/>.</summary>
    public void RegisterIrqfd(int eventFd, uint gsi)
    {
        var irqfd = new kvm_irqfd { fd = (uint)eventFd, gsi = gsi };
        // SAFETY: &irqfd is a local of the size KVM_IRQFD encodes (layout tests); KVM uses it during the call only.
        if (Libc.ioctl(Fd, KVM_IRQFD, &irqfd) < 0)
            KvmException.Throw("KVM_IRQFD");
    }

    /// <summary>
    /// KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE (api.rst §4.75): a write to <paramref name="eventFd"/>
    /// asserts <paramref name="gsi"/> as a level; when the guest EOIs it, KVM deasserts it and
    /// signals <paramref name="resampleFd"/>, so the VMM re-asserts while the source is still pending.
    /// Needs the in-kernel irqchip (KVM_CAP_IRQFD_RESAMPLE).
    /// </summary>
    /// <exception cref="KvmException">The host refused it.</exception>
    public void RegisterIrqfdWithResample(int eventFd, uint gsi, int resampleFd)
    {
        var irqfd = new kvm_irqfd { fd = (uint)eventFd, gsi = gsi, flags = KvmConstants.KVM_IRQFD_FLAG_RESAMPLE, resamplefd = (uint)resampleFd };
        if (Libc.ioctl(Fd, KVM_IRQFD, &irqfd) < 0)
            KvmException.Throw("KVM_IRQFD(resample)");
    }

    /// <summary>KVM_IRQFD with KVM_IRQFD_FLAG_DEASSIGN.</summary>
    public void UnregisterIrqfd(int eventFd, uint gsi)
    {
        var irqfd = new kvm_irqfd { fd = (uint)eventFd, gsi = gsi, flags = KvmConstants.KVM_IRQFD_FLAG_DEASSIGN };
        // SAFETY: &irqfd is a local of the size KVM_IRQFD encodes (layout tests); KVM uses it during the call only.
        if (Libc.ioctl(Fd, KVM_IRQFD, &irqfd) < 0)
            KvmException.Throw("KVM_IRQFD(deassign)");
    }

    /// <summary>
    /// KVM_IOEVENTFD: a guest write to <paramref name="address"/> (port or MMIO) signals
    /// <paramref name="eventFd"/> without leaving the kernel.
    /// </summary>
    public void RegisterIoeventfd(int eventFd, ulong address, uint length, bool pio, ulong? dataMatch = null, bool deassign = false)
    {
        var e = new kvm_ioeventfd
        {
            addr = address,
            len = length,
            fd = eventFd,
            datamatch = dataMatch ?? 0,
            flags = (pio ? KvmConstants.KVM_IOEVENTFD_FLAG_PIO : 0)
                    | (dataMatch.HasValue ? KvmConstants.KVM_IOEVENTFD_FLAG_DATAMATCH : 0)
                    | (deassign ? KvmConstants.KVM_IOEVENTFD_FLAG_DEASSIGN : 0),
        };
        // SAFETY: &e is a local of the size KVM_IOEVENTFD encodes (layout tests); KVM uses it during the call only.
        if (Libc.ioctl(Fd, KVM_IOEVENTFD, &e) < 0)
            KvmException.Throw("KVM_IOEVENTFD");
    }

    /// <summary>
    /// KVM_SIGNAL_MSI: injects one MSI message (address/data as the guest programmed them). Returns
    /// false when the guest blocked it (KVM returns 0); never throws, it is called on device paths.
    /// </summary>
    public bool SignalMsi(ulong address, uint data)
    {
        var msi = new kvm_msi { address_lo = (uint)address, address_hi = (uint)(address >> 32), data = data };
        // SAFETY: &msi is a local of the size KVM_SIGNAL_MSI encodes (layout tests); KVM uses it during the call only.
        return Libc.ioctl(Fd, KVM_SIGNAL_MSI, &msi) > 0;
    }

    /// <summary>KVM_SET_GSI_ROUTING: replaces the whole routing table.</summary>
    public void SetGsiRouting(ReadOnlySpan<kvm_irq_routing_entry> entries)
    {
        int size = 8 + entries.Length * sizeof(kvm_irq_routing_entry);
        byte[] buf = new byte[size];
        // SAFETY: buf is the 8-byte header plus exactly the entries the header's count announces; KVM reads no further.
        fixed (byte* p = buf)
        {
            *(uint*)p = (uint)entries.Length;
            entries.CopyTo(new Span<kvm_irq_routing_entry>(p + 8, entries.Length));
            if (Libc.ioctl(Fd, KVM_SET_GSI_ROUTING, p) < 0)
                KvmException.Throw("KVM_SET_GSI_ROUTING");
        }
    }

    /// <summary>KVM_CREATE_VCPU, then maps its kvm_run page once.</summary>
    /// <exception cref="KvmException">The ioctl or the mapping failed.</exception>
    public KvmVcpu CreateVcpu(int id)
    {
        int fd = Libc.ioctl(Fd, KVM_CREATE_VCPU, id);
        if (fd < 0)
            KvmException.Throw("KVM_CREATE_VCPU");
        var handle = new FileDescriptor(fd);
        // SAFETY: a new shared mapping of the vCPU fd, of the size KVM_GET_VCPU_MMAP_SIZE reported;
        // KvmVcpu owns it and unmaps it once.
        void* run = Libc.mmap(null, (nuint)_vcpuMmapSize, Libc.PROT_READ | Libc.PROT_WRITE, Libc.MAP_SHARED, fd, 0);
        if ((nint)run == Libc.MAP_FAILED)
        {
            int errno = Libc.LastErrno;
            handle.Dispose();
            throw new KvmException("mmap(kvm_run)", errno);
        }
        return new KvmVcpu(id, handle, (kvm_run*)run, _vcpuMmapSize);
    }

    public void Dispose() => _fd.Dispose();
}
