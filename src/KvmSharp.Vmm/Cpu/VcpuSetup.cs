using KvmSharp.Boot;
using KvmSharp.Kvm;
using KvmSharp.Kvm.Native;

namespace KvmSharp.Vmm.Cpu;

/// <summary>Turns the boot loader's results into vCPU state: CPUID, MSRs, LAPIC LVTs, registers.</summary>
internal static class VcpuSetup
{
    public static void SetCpuid(KvmVcpu vcpu, kvm_cpuid_entry2[] supported, int cpuCount, CpuTemplate template)
    {
        var neutral = new CpuidEntry[supported.Length];
        for (int i = 0; i < supported.Length; i++)
        {
            var e = supported[i];
            neutral[i] = new CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx);
        }
        var shaped = CpuidShaper.ForVcpu(neutral, vcpu.Id, cpuCount, template);
        var native = new kvm_cpuid_entry2[shaped.Length];
        for (int i = 0; i < shaped.Length; i++)
        {
            var e = shaped[i];
            native[i] = new kvm_cpuid_entry2 { function = e.Function, index = e.Index, flags = e.Flags, eax = e.Eax, ebx = e.Ebx, ecx = e.Ecx, edx = e.Edx };
        }
        vcpu.SetCpuid(native);
    }

    /// <summary>Sets the boot MSRs one by one, so that one the host refuses does not hide the others; returns the refused ones.</summary>
    public static List<uint> SetMsrs(KvmVcpu vcpu)
    {
        var refused = new List<uint>();
        Span<kvm_msr_entry> one = stackalloc kvm_msr_entry[1];
        foreach (var (index, value) in BootMsrs.Defaults)
        {
            one[0] = new kvm_msr_entry { index = index, data = value };
            if (vcpu.SetMsrs(one) != 1)
                refused.Add(index);
        }
        return refused;
    }

    /// <summary>
    /// LAPIC LVT LINT0 = ExtINT (the 8259 is wired there) and LINT1 = NMI, as the MP spec's virtual-wire
    /// mode expects (MP spec 1.4 §3.6.2.2; Firecracker's set_lint does the same).
    /// </summary>
    public static unsafe void SetLint(KvmVcpu vcpu)
    {
        const int ApicLvtLint0 = 0x350, ApicLvtLint1 = 0x360;
        const uint DeliveryModeMask = 0x700, ExtInt = 0x700, Nmi = 0x400;
        vcpu.GetLapic(out var lapic);
        uint* lint0 = (uint*)(lapic.regs + ApicLvtLint0);
        uint* lint1 = (uint*)(lapic.regs + ApicLvtLint1);
        *lint0 = (*lint0 & ~DeliveryModeMask) | ExtInt;
        *lint1 = (*lint1 & ~DeliveryModeMask) | Nmi;
        vcpu.SetLapic(lapic);
    }

    /// <summary>Sets the boot vCPU's registers for the entry mode (see <see cref="BootEntryMode"/>).</summary>
    public static void SetBootRegisters(KvmVcpu vcpu, BootResult boot)
    {
        vcpu.GetSpecialRegisters(out var s);
        var code = ToSegment(boot.CodeSegment, boot.CodeSelector);
        var data = ToSegment(boot.DataSegment, boot.DataSelector);
        s.cs = code;
        s.ds = s.es = s.fs = s.gs = s.ss = data;
        if (boot.TssSelector != 0)
            s.tr = ToSegment(boot.TssSegment, boot.TssSelector);
        s.gdt.@base = boot.GdtBase;
        s.gdt.limit = boot.GdtLimit;
        s.idt.@base = 0;
        s.idt.limit = 0;
        // Control registers come from the boot loader, which knows what each entry mode needs.
        s.cr0 = boot.Cr0;
        s.cr3 = boot.PageTableBase;
        s.cr4 = boot.Cr4;
        s.efer = boot.Efer;
        var regs = new kvm_regs { rip = boot.EntryPoint, rflags = boot.Rflags, rsp = boot.StackPointer };
        if (boot.Mode == BootEntryMode.Long64)
            regs.rsi = boot.BootInfoAddress; // boot.rst: RSI = struct boot_params
        else
            regs.rbx = boot.BootInfoAddress; // PVH: EBX = struct hvm_start_info
        vcpu.SetSpecialRegisters(s);
        vcpu.SetRegisters(regs);
    }

    private static kvm_segment ToSegment(SegmentDescriptor d, ushort selector) => new()
    {
        @base = d.Base,
        limit = d.Limit,
        selector = selector,
        type = d.Type,
        present = d.Present ? (byte)1 : (byte)0,
        dpl = d.Dpl,
        db = d.Db ? (byte)1 : (byte)0,
        s = d.S ? (byte)1 : (byte)0,
        l = d.L ? (byte)1 : (byte)0,
        g = d.G ? (byte)1 : (byte)0,
        avl = d.Avl ? (byte)1 : (byte)0,
    };
}
