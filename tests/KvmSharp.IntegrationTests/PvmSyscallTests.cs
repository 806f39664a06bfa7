using KvmSharp.Kvm;
using KvmSharp.Kvm.Native;
using KvmSharp.Memory;
using KvmSharp.Vmm.Pvm;
using Xunit;
using static KvmSharp.Kvm.Native.KvmConstants;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// A hand-assembled two-ring guest: user code at CPL 3 executes <c>syscall</c>; the "kernel" at
/// LSTAR reports its CS. On hardware KVM the CPU does the entry; on a PVM host the entry is left
/// at CPL 3 and PvmCompat's #PF-entry hook must complete it. Either way the user-visible result is
/// the same, which is what this test asserts.
/// </summary>
public sealed unsafe class PvmSyscallTests
{
    private const ulong Gdt = 0x1000, Idt = 0x3000, Tss = 0x4000, PfHandler = 0x5000, Lstar = 0x6000;
    private const ulong Pml4 = 0x8000, Pdpt = 0x9000, Pd = 0xA000, KernelStack = 0x1F_F000, UserCode = 0x20_0000, UserStack = 0x3F_F000;

    [Fact]
    public void UserSyscallEntersTheKernelAtCpl0()
    {
        Assets.RequireKvm();
        using var kvm = KvmSystem.Open();
        using var vm = kvm.CreateVm();
        using var memory = GuestMemory.CreateAnonymous([(new GuestAddress(0), 4UL << 20)]);
        vm.SetUserMemoryRegion(0, 0, memory.Regions[0].Size, memory.Regions[0].HostAddressForKvm);
        using var vcpu = vm.CreateVcpu(0);

        // Page tables: [0, 2 MiB) supervisor only (the "kernel"), [2 MiB, 4 MiB) user.
        memory.Write(new GuestAddress(Pml4), Pdpt | 7);
        memory.Write(new GuestAddress(Pdpt), Pd | 7);
        memory.Write(new GuestAddress(Pd), 0x83UL);
        memory.Write(new GuestAddress(Pd + 8), 0x20_0000UL | 0x87);
        // GDT: 0x08 kernel code, 0x10 kernel data, 0x18 user data, 0x20 user code, 0x28 TSS (16 bytes).
        ulong tssLow = 0x67 | ((Tss & 0xFFFFFF) << 16) | (0x89UL << 40) | ((Tss >> 24) << 56);
        ulong[] gdt = [0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0x00cff3000000ffff, 0x00affb000000ffff, tssLow, Tss >> 32];
        for (int i = 0; i < gdt.Length; i++)
            memory.Write(new GuestAddress(Gdt + (ulong)i * 8), gdt[i]);
        memory.Write(new GuestAddress(Tss + 4), KernelStack); // TSS.RSP0
        // IDT[14] → PfHandler: interrupt gate, DPL 0, selector 0x08.
        ulong gateLow = (PfHandler & 0xFFFF) | (0x08UL << 16) | (0x8EUL << 40) | (((PfHandler >> 16) & 0xFFFF) << 48);
        memory.Write(new GuestAddress(Idt + 14 * 16), gateLow);
        memory.Write(new GuestAddress(Idt + 14 * 16 + 8), PfHandler >> 32);
        // #PF handler: nopl (%rax); mov al,0xEE; out 0xf5,al; hlt — reached only if the syscall was not completed.
        memory.Write(new GuestAddress(PfHandler), new byte[] { 0x0F, 0x1F, 0x00, 0xB0, 0xEE, 0xE6, 0xF5, 0xF4 });
        // LSTAR: mov al,0x55; out 0xf4,al; mov eax,cs; out 0xf6,al; hlt
        memory.Write(new GuestAddress(Lstar), new byte[] { 0xB0, 0x55, 0xE6, 0xF4, 0x8C, 0xC8, 0xE6, 0xF6, 0xF4 });
        // User code: syscall
        memory.Write(new GuestAddress(UserCode), new byte[] { 0x0F, 0x05, 0xEB, 0xFE });

        vcpu.GetSpecialRegisters(out var s);
        s.cs = new kvm_segment { selector = 0x20 | 3, limit = 0xFFFFFFFF, type = 11, present = 1, dpl = 3, s = 1, l = 1, g = 1 };
        s.ds = s.es = s.fs = s.gs = s.ss = new kvm_segment { selector = 0x18 | 3, limit = 0xFFFFFFFF, type = 3, present = 1, dpl = 3, s = 1, db = 1, g = 1 };
        s.tr = new kvm_segment { selector = 0x28, @base = Tss, limit = 0x67, type = 11, present = 1, s = 0 };
        s.gdt.@base = Gdt;
        s.gdt.limit = (ushort)(gdt.Length * 8 - 1);
        s.idt.@base = Idt;
        s.idt.limit = 256 * 16 - 1;
        s.cr3 = Pml4;
        s.cr4 = 1 << 5;
        s.cr0 = 0x80000001 | (1 << 4) | (1 << 5) | (1 << 16);
        s.efer = (1 << 8) | (1 << 10) | 1; // LME | LMA | SCE
        vcpu.SetSpecialRegisters(s);
        vcpu.SetRegisters(new kvm_regs { rip = UserCode, rsp = UserStack, rflags = 0x202 });
        Assert.Equal(3, vcpu.SetMsrs([
            new kvm_msr_entry { index = 0xC0000081, data = (0x08UL << 32) | (0x10UL << 48) }, // STAR
            new kvm_msr_entry { index = 0xC0000082, data = Lstar },                             // LSTAR
            new kvm_msr_entry { index = 0xC0000084, data = 0x200 },                             // SYSCALL_MASK: IF
        ]));

        PvmCompat? pvm = null;
        if (KvmSystem.IsPvmHost)
        {
            var hook = new PvmHook();
            pvm = new PvmCompat(vcpu, memory, hook);
            pvm.Poll();
            Assert.True(hook.IsInstalled, "the #PF-entry hook was not installed");
        }

        var ports = new List<(ushort Port, byte Value)>();
        for (int i = 0; i < 20 && ports.Count < 2; i++)
        {
            Assert.Equal(0, vcpu.Run());
            ref var run = ref vcpu.RunData;
            if (run.exit_reason == KVM_EXIT_IO)
                ports.Add((run.io_port, vcpu.RunBase[run.io_data_offset]));
            else if (run.exit_reason == KVM_EXIT_INTERNAL_ERROR && pvm is not null)
                Assert.True(pvm.TryHandleEmulationFailure(ref run), "PvmCompat could not handle the emulation failure");
            else
                Assert.Fail($"unexpected exit {run.exit_reason}");
        }
        Assert.Equal([((ushort)0xF4, (byte)0x55), ((ushort)0xF6, (byte)0x08)], ports);
        if (pvm is not null)
            Assert.Equal(1, pvm.SyscallsCompleted);
    }
}
