using KvmSharp.Interop;

namespace KvmSharp.Kvm.Native;

/// <summary>
/// Ioctl request numbers, built with the _IO/_IOR/_IOW/_IOWR encoding and literal struct sizes
/// (the layout tests check those sizes against the C headers). Only the typed wrappers in
/// <see cref="KvmSystem"/>, <see cref="KvmVm"/> and <see cref="KvmVcpu"/> use them.
/// </summary>
internal static class KvmIoctls
{
    private const uint KVMIO = 0xAE;

    // struct sizes, in bytes
    internal const uint SizeofCpuid2Header = 8;
    internal const uint SizeofMsrsHeader = 8;

    // System ioctls
    internal static readonly nuint KVM_GET_API_VERSION = Libc.IO(KVMIO, 0x00);
    internal static readonly nuint KVM_CREATE_VM = Libc.IO(KVMIO, 0x01);
    internal static readonly nuint KVM_CHECK_EXTENSION = Libc.IO(KVMIO, 0x03);
    internal static readonly nuint KVM_GET_VCPU_MMAP_SIZE = Libc.IO(KVMIO, 0x04);
    internal static readonly nuint KVM_GET_SUPPORTED_CPUID = Libc.IOWR(KVMIO, 0x05, SizeofCpuid2Header);

    // VM ioctls
    internal static readonly nuint KVM_CREATE_VCPU = Libc.IO(KVMIO, 0x41);
    internal static readonly nuint KVM_SET_USER_MEMORY_REGION = Libc.IOW(KVMIO, 0x46, 32);
    internal static readonly nuint KVM_SET_TSS_ADDR = Libc.IO(KVMIO, 0x47);
    internal static readonly nuint KVM_SET_IDENTITY_MAP_ADDR = Libc.IOW(KVMIO, 0x48, 8);
    internal static readonly nuint KVM_CREATE_IRQCHIP = Libc.IO(KVMIO, 0x60);
    internal static readonly nuint KVM_IRQ_LINE = Libc.IOW(KVMIO, 0x61, 8);
    internal static readonly nuint KVM_SET_GSI_ROUTING = Libc.IOW(KVMIO, 0x6a, 8);
    internal static readonly nuint KVM_IRQFD = Libc.IOW(KVMIO, 0x76, 32);
    internal static readonly nuint KVM_CREATE_PIT2 = Libc.IOW(KVMIO, 0x77, 64);
    internal static readonly nuint KVM_IOEVENTFD = Libc.IOW(KVMIO, 0x79, 64);
    internal static readonly nuint KVM_SIGNAL_MSI = Libc.IOW(KVMIO, 0xa5, 32);
    internal static readonly nuint KVM_ENABLE_CAP = Libc.IOW(KVMIO, 0xa3, 104);

    // vCPU ioctls
    internal static readonly nuint KVM_RUN = Libc.IO(KVMIO, 0x80);
    internal static readonly nuint KVM_GET_REGS = Libc.IOR(KVMIO, 0x81, 144);
    internal static readonly nuint KVM_SET_REGS = Libc.IOW(KVMIO, 0x82, 144);
    internal static readonly nuint KVM_GET_SREGS = Libc.IOR(KVMIO, 0x83, 312);
    internal static readonly nuint KVM_SET_SREGS = Libc.IOW(KVMIO, 0x84, 312);
    internal static readonly nuint KVM_GET_MSRS = Libc.IOWR(KVMIO, 0x88, SizeofMsrsHeader);
    internal static readonly nuint KVM_SET_MSRS = Libc.IOW(KVMIO, 0x89, SizeofMsrsHeader);
    internal static readonly nuint KVM_GET_LAPIC = Libc.IOR(KVMIO, 0x8e, 1024);
    internal static readonly nuint KVM_SET_LAPIC = Libc.IOW(KVMIO, 0x8f, 1024);
    internal static readonly nuint KVM_SET_CPUID2 = Libc.IOW(KVMIO, 0x90, SizeofCpuid2Header);
    internal static readonly nuint KVM_GET_MP_STATE = Libc.IOR(KVMIO, 0x98, 4);
    internal static readonly nuint KVM_SET_MP_STATE = Libc.IOW(KVMIO, 0x99, 4);
    internal static readonly nuint KVM_SET_GUEST_DEBUG = Libc.IOW(KVMIO, 0x9b, 72);
    internal static readonly nuint KVM_GET_VCPU_EVENTS = Libc.IOR(KVMIO, 0x9f, 64);
    internal static readonly nuint KVM_SET_VCPU_EVENTS = Libc.IOW(KVMIO, 0xa0, 64);
}
