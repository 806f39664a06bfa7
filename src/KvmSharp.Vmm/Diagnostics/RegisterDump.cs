using System.Text;
using Iced.Intel;
using KvmSharp.Kvm;
using KvmSharp.Kvm.Native;
using KvmSharp.Memory;
using KvmSharp.Vmm.Cpu;

namespace KvmSharp.Vmm.Diagnostics;

/// <summary>
/// The register dump printed when a VM dies (triple fault, unhandled internal error): general and
/// control registers, segments, and the faulting instruction disassembled with Iced.
/// </summary>
public static class RegisterDump
{
    public static string Format(KvmVcpu vcpu, GuestMemory memory, ReadOnlySpan<byte> knownInstruction = default)
    {
        var sb = new StringBuilder();
        try
        {
            vcpu.GetRegisters(out var r);
            vcpu.GetSpecialRegisters(out var s);
            sb.Append($"vcpu{vcpu.Id}: RIP={r.rip:x16} RFLAGS={r.rflags:x8} CPL={s.cs.selector & 3}\n");
            sb.Append($"  RAX={r.rax:x16} RBX={r.rbx:x16} RCX={r.rcx:x16} RDX={r.rdx:x16}\n");
            sb.Append($"  RSI={r.rsi:x16} RDI={r.rdi:x16} RBP={r.rbp:x16} RSP={r.rsp:x16}\n");
            sb.Append($"  R8 ={r.r8:x16} R9 ={r.r9:x16} R10={r.r10:x16} R11={r.r11:x16}\n");
            sb.Append($"  R12={r.r12:x16} R13={r.r13:x16} R14={r.r14:x16} R15={r.r15:x16}\n");
            sb.Append($"  CR0={s.cr0:x8} CR2={s.cr2:x16} CR3={s.cr3:x16} CR4={s.cr4:x8} EFER={s.efer:x}\n");
            sb.Append($"  CS={s.cs.selector:x4} base={s.cs.@base:x} l={s.cs.l} db={s.cs.db}  SS={s.ss.selector:x4}  GDT={s.gdt.@base:x}/{s.gdt.limit:x} IDT={s.idt.@base:x}/{s.idt.limit:x}\n");
            if (IsResetState(r, s))
            {
                // AMD SVM: KVM reinitializes the VMCB after a SHUTDOWN intercept (arch/x86/kvm/svm/svm.c,
                // shutdown_interception), so what the guest had at the triple fault is gone.
                sb.Append("  (this is the x86 reset state: on AMD hosts KVM resets the vCPU on a triple fault, so the faulting state is lost)\n");
                return sb.ToString();
            }

            Span<byte> code = stackalloc byte[15];
            int len;
            if (!knownInstruction.IsEmpty)
            {
                len = Math.Min(15, knownInstruction.Length);
                knownInstruction[..len].CopyTo(code);
            }
            else
            {
                len = GuestPageWalker.TryReadVirtual(memory, s, GuestPageWalker.CodeAddress(s, r.rip), code) ? 15 : 0;
            }
            if (len > 0)
                sb.Append($"  code: {Convert.ToHexString(code[..len]).ToLowerInvariant()}  =>  {Disassemble(code[..len], GuestPageWalker.Bitness(s), r.rip)}\n");
            else
                sb.Append("  code: (RIP is not mapped to guest RAM)\n");
        }
        catch (KvmException e)
        {
            sb.Append($"vcpu{vcpu.Id}: registers unavailable: {e.Message}\n");
        }
        return sb.ToString();
    }

    /// <summary>RIP 0xfff0 with CS base 0xffff0000 and paging off: the state INIT/RESET leaves (SDM Vol. 3 §10.1.1; APM Vol. 2 §14.1.3).</summary>
    private static bool IsResetState(in kvm_regs r, in kvm_sregs s) =>
        r.rip == 0xFFF0 && s.cs.selector == 0xF000 && s.cs.@base == 0xFFFF0000 && (s.cr0 & 0x8000_0001) == 0;

    public static string Disassemble(ReadOnlySpan<byte> code, int bitness, ulong ip)
    {
        var decoder = Iced.Intel.Decoder.Create(bitness, new ByteArrayCodeReader(code.ToArray()));
        decoder.IP = ip;
        decoder.Decode(out var instr);
        if (instr.IsInvalid)
            return "(invalid instruction)";
        var formatter = new GasFormatter();
        var output = new StringOutput();
        formatter.Format(instr, output);
        return output.ToStringAndReset();
    }
}
