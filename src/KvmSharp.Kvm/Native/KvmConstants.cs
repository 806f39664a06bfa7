namespace KvmSharp.Kvm.Native;

/// <summary>Constants from include/uapi/linux/kvm.h.</summary>
public static class KvmConstants
{
    public const int KVM_API_VERSION = 12;

    public const uint KVM_EXIT_UNKNOWN = 0;
    public const uint KVM_EXIT_EXCEPTION = 1;
    public const uint KVM_EXIT_IO = 2;
    public const uint KVM_EXIT_HYPERCALL = 3;
    public const uint KVM_EXIT_DEBUG = 4;
    public const uint KVM_EXIT_HLT = 5;
    public const uint KVM_EXIT_MMIO = 6;
    public const uint KVM_EXIT_IRQ_WINDOW_OPEN = 7;
    public const uint KVM_EXIT_SHUTDOWN = 8;
    public const uint KVM_EXIT_FAIL_ENTRY = 9;
    public const uint KVM_EXIT_INTR = 10;
    public const uint KVM_EXIT_NMI = 16;
    public const uint KVM_EXIT_INTERNAL_ERROR = 17;
    public const uint KVM_EXIT_SYSTEM_EVENT = 24;

    public const byte KVM_EXIT_IO_IN = 0;
    public const byte KVM_EXIT_IO_OUT = 1;

    public const uint KVM_INTERNAL_ERROR_EMULATION = 1;
    public const uint KVM_INTERNAL_ERROR_SIMUL_EX = 2;
    public const uint KVM_INTERNAL_ERROR_DELIVERY_EV = 3;
    public const ulong KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1;

    public const uint KVM_SYSTEM_EVENT_SHUTDOWN = 1;
    public const uint KVM_SYSTEM_EVENT_RESET = 2;
    public const uint KVM_SYSTEM_EVENT_CRASH = 3;

    public const int KVM_CAP_IRQCHIP = 0;
    public const int KVM_CAP_HLT = 1;
    public const int KVM_CAP_USER_MEMORY = 3;
    public const int KVM_CAP_NR_VCPUS = 9;
    public const int KVM_CAP_PIT2 = 33;
    public const int KVM_CAP_IRQFD = 32;
    public const int KVM_CAP_IOEVENTFD = 36;
    public const int KVM_CAP_MAX_VCPUS = 66;
    public const int KVM_CAP_IMMEDIATE_EXIT = 136;

    public const uint KVM_PIT_SPEAKER_DUMMY = 1;
    public const uint KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1;

    public const uint KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0;
    public const uint KVM_IOEVENTFD_FLAG_PIO = 1 << 1;
    public const uint KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2;
    public const uint KVM_IRQFD_FLAG_DEASSIGN = 1 << 0;
    public const uint KVM_IRQFD_FLAG_RESAMPLE = 1 << 1;

    public const uint KVM_IRQ_ROUTING_IRQCHIP = 1;
    public const uint KVM_IRQ_ROUTING_MSI = 2;
    public const uint KVM_IRQCHIP_PIC_MASTER = 0;
    public const uint KVM_IRQCHIP_PIC_SLAVE = 1;
    public const uint KVM_IRQCHIP_IOAPIC = 2;

    public const uint KVM_GUESTDBG_ENABLE = 0x00000001;
    public const uint KVM_GUESTDBG_SINGLESTEP = 0x00000002;
    public const uint KVM_GUESTDBG_USE_SW_BP = 0x00010000;
    public const uint KVM_GUESTDBG_INJECT_BP = 0x00040000;

    public const uint KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001;
    public const uint KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002;
    public const uint KVM_VCPUEVENT_VALID_SHADOW = 0x00000004;
    public const uint KVM_VCPUEVENT_VALID_SMM = 0x00000008;
    public const uint KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010;
}
