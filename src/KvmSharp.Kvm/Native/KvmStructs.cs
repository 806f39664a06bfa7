using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

// Layouts from include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h (x86-64).
// Sizes are pinned by KvmSharp.Kvm.Tests against a C probe compiled with the host headers.
namespace KvmSharp.Kvm.Native;

[StructLayout(LayoutKind.Sequential)]
public struct kvm_regs
{
    public ulong rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    public ulong r8, r9, r10, r11, r12, r13, r14, r15;
    public ulong rip, rflags;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_segment
{
    public ulong @base;
    public uint limit;
    public ushort selector;
    public byte type;
    public byte present, dpl, db, s, l, g, avl;
    public byte unusable;
    public byte padding;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_dtable
{
    public ulong @base;
    public ushort limit;
    public ushort padding0, padding1, padding2;
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_sregs
{
    public kvm_segment cs, ds, es, fs, gs, ss;
    public kvm_segment tr, ldt;
    public kvm_dtable gdt, idt;
    public ulong cr0, cr2, cr3, cr4, cr8;
    public ulong efer;
    public ulong apic_base;
    public fixed ulong interrupt_bitmap[4];
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_userspace_memory_region
{
    public uint slot;
    public uint flags;
    public ulong guest_phys_addr;
    public ulong memory_size;
    public ulong userspace_addr;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_cpuid_entry2
{
    public uint function;
    public uint index;
    public uint flags;
    public uint eax, ebx, ecx, edx;
    public uint padding0, padding1, padding2;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_msr_entry
{
    public uint index;
    public uint reserved;
    public ulong data;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_pit_config
{
    public uint flags;
    public PitPad pad;

    [InlineArray(15)]
    public struct PitPad { private uint _e0; }
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_irqfd
{
    public uint fd;
    public uint gsi;
    public uint flags;
    public uint resamplefd;
    public fixed byte pad[16];
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_ioeventfd
{
    public ulong datamatch;
    public ulong addr;
    public uint len;
    public int fd;
    public uint flags;
    public fixed byte pad[36];
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_irq_level
{
    public uint irq;
    public uint level;
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_vcpu_events
{
    public byte exception_injected, exception_nr, exception_has_error_code, exception_pending;
    public uint exception_error_code;
    public byte interrupt_injected, interrupt_nr, interrupt_soft, interrupt_shadow;
    public byte nmi_injected, nmi_pending, nmi_masked, nmi_pad;
    public uint sipi_vector;
    public uint flags;
    public byte smi_smm, smi_pending, smi_smm_inside_nmi, smi_latched_init;
    public byte triple_fault_pending;
    public fixed byte reserved[26];
    public byte exception_has_payload;
    public ulong exception_payload;
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_lapic_state
{
    public fixed byte regs[1024];
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_guest_debug
{
    public uint control;
    public uint pad;
    public fixed ulong debugreg[8];
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_enable_cap
{
    public uint cap;
    public uint flags;
    public fixed ulong args[4];
    public fixed byte pad[64];
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_msi
{
    public uint address_lo;
    public uint address_hi;
    public uint data;
    public uint flags;
    public uint devid;
    public fixed byte pad[12];
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_mp_state
{
    public uint mp_state;
}

/// <summary>struct kvm_irq_routing_entry; the union is 32 bytes (MSI: address_lo, address_hi, data, devid).</summary>
[StructLayout(LayoutKind.Explicit, Size = 48)]
public struct kvm_irq_routing_entry
{
    [FieldOffset(0)] public uint gsi;
    [FieldOffset(4)] public uint type;
    [FieldOffset(8)] public uint flags;
    [FieldOffset(12)] public uint pad;
    // KVM_IRQ_ROUTING_IRQCHIP
    [FieldOffset(16)] public uint irqchip_irqchip;
    [FieldOffset(20)] public uint irqchip_pin;
    // KVM_IRQ_ROUTING_MSI
    [FieldOffset(16)] public uint msi_address_lo;
    [FieldOffset(20)] public uint msi_address_hi;
    [FieldOffset(24)] public uint msi_data;
    [FieldOffset(28)] public uint msi_devid;
}

/// <summary>
/// struct kvm_run: the shared page of one vCPU, mapped once (style.md §3). The exit union lies at
/// offset 32 and is 256 bytes; only the members KvmSharp reads are declared.
/// </summary>
[StructLayout(LayoutKind.Explicit, Size = 2352)]
public unsafe struct kvm_run
{
    [FieldOffset(0)] public byte request_interrupt_window;
    [FieldOffset(1)] public byte immediate_exit;
    [FieldOffset(8)] public uint exit_reason;
    [FieldOffset(12)] public byte ready_for_interrupt_injection;
    [FieldOffset(13)] public byte if_flag;
    [FieldOffset(14)] public ushort flags;
    [FieldOffset(16)] public ulong cr8;
    [FieldOffset(24)] public ulong apic_base;

    // KVM_EXIT_UNKNOWN
    [FieldOffset(32)] public ulong hw_hardware_exit_reason;
    // KVM_EXIT_FAIL_ENTRY
    [FieldOffset(32)] public ulong fail_entry_hardware_entry_failure_reason;
    [FieldOffset(40)] public uint fail_entry_cpu;
    // KVM_EXIT_EXCEPTION
    [FieldOffset(32)] public uint ex_exception;
    [FieldOffset(36)] public uint ex_error_code;
    // KVM_EXIT_IO
    [FieldOffset(32)] public byte io_direction;
    [FieldOffset(33)] public byte io_size;
    [FieldOffset(34)] public ushort io_port;
    [FieldOffset(36)] public uint io_count;
    [FieldOffset(40)] public ulong io_data_offset;
    // KVM_EXIT_DEBUG (kvm_debug_exit_arch: exception, pad, pc, dr6, dr7)
    [FieldOffset(32)] public uint debug_exception;
    [FieldOffset(40)] public ulong debug_pc;
    [FieldOffset(48)] public ulong debug_dr6;
    [FieldOffset(56)] public ulong debug_dr7;
    // KVM_EXIT_MMIO
    [FieldOffset(32)] public ulong mmio_phys_addr;
    [FieldOffset(40)] public fixed byte mmio_data[8];
    [FieldOffset(48)] public uint mmio_len;
    [FieldOffset(52)] public byte mmio_is_write;
    // KVM_EXIT_INTERNAL_ERROR and its emulation_failure overlay
    [FieldOffset(32)] public uint internal_suberror;
    [FieldOffset(36)] public uint internal_ndata;
    [FieldOffset(40)] public fixed ulong internal_data[16];
    [FieldOffset(40)] public ulong emulation_failure_flags;
    [FieldOffset(48)] public byte emulation_failure_insn_size;
    [FieldOffset(49)] public fixed byte emulation_failure_insn_bytes[15];
    // KVM_EXIT_SYSTEM_EVENT
    [FieldOffset(32)] public uint system_event_type;
    [FieldOffset(36)] public uint system_event_ndata;
    [FieldOffset(40)] public fixed ulong system_event_data[16];

    [FieldOffset(288)] public ulong kvm_valid_regs;
    [FieldOffset(296)] public ulong kvm_dirty_regs;
}
