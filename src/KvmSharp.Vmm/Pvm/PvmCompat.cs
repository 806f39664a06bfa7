using Iced.Intel;
using KvmSharp.Boot;
using KvmSharp.Kvm;
using KvmSharp.Kvm.Native;
using KvmSharp.Memory;
using KvmSharp.Vmm.Cpu;

namespace KvmSharp.Vmm.Pvm;

/// <summary>
/// Everything KvmSharp does differently on a PVM host (<c>kvm_pvm</c>: guest ring 0 is run by the
/// host's instruction emulator). Off on hardware KVM. Each quirk, why, and how it was found is in
/// docs/pvm.md. In short:
/// <list type="number">
/// <item>The host ignores our CPUID table, so features whose instructions its emulator cannot run,
/// and those the user's CPU template hides, are taken away with kernel parameters
/// (<see cref="AdjustCommandLine(string, CpuTemplate, TextWriter)"/>).</item>
/// <item>Instructions the emulator fails on come back as KVM_EXIT_INTERNAL_ERROR (emulation) with
/// the instruction bytes; we complete them or inject what the CPU would raise
/// (<see cref="TryHandleEmulationFailure"/>).</item>
/// <item>A user-mode <c>syscall</c> lands at MSR_LSTAR still at CPL 3 and faults. We hook the
/// guest's #PF entry with an <c>int3</c> (which the emulator reports to us) and complete the
/// syscall entry the CPU should have made (<see cref="Poll"/>, <see cref="TryCompleteSyscall"/>).</item>
/// </list>
/// One instance per vCPU; the hook location is shared through <see cref="PvmHook"/>.
/// </summary>
internal sealed class PvmCompat
{
    private const ulong RFLAGS_AC = 1UL << 18;
    private const uint MSR_STAR = 0xC0000081, MSR_LSTAR = 0xC0000082, MSR_SYSCALL_MASK = 0xC0000084;

    private readonly KvmVcpu _vcpu;
    private readonly GuestMemory _memory;
    private readonly PvmHook _hook;
    private readonly ReusableCodeReader _reader = new();
    private readonly Decoder _decoder64;
    private readonly kvm_msr_entry[] _msrs = new kvm_msr_entry[3];
    private readonly byte[] _frame = new byte[48];

    public PvmCompat(KvmVcpu vcpu, GuestMemory memory, PvmHook hook)
    {
        _vcpu = vcpu;
        _memory = memory;
        _hook = hook;
        _decoder64 = Decoder.Create(64, _reader);
    }

    /// <summary>KVMSHARP_TRACE_PVM=1: print RIP and the layer's counters at every poll (development aid).</summary>
    private static readonly bool Trace = Environment.GetEnvironmentVariable("KVMSHARP_TRACE_PVM") == "1";

    public long EmulatedInstructions { get; private set; }
    public long SyscallsCompleted { get; private set; }
    public long PageFaultHookHits { get; private set; }

    /// <summary>
    /// The guest's command line on a PVM host. The host ignores our CPUID table, so what
    /// <see cref="CpuTemplate.Pvm"/> (features whose instructions its emulator cannot run in guest ring 0:
    /// xrstor → noxsave, SLUB's lock cmpxchg16b → cx16, popcnt, clac/stac, rdrand/rdseed, SIMD crypto …)
    /// and the user's <paramref name="template"/> hide is taken away with kernel parameters instead
    /// (<see cref="CpuTemplate.LinuxKernelArguments(out IReadOnlyList{CpuidBit})"/>, the one source of them).
    /// Parameters the user already gave win: <c>noxsave</c> is not repeated, and with a
    /// <c>clearcpuid=</c> of the user's own ours is left out (Linux reads only the last one,
    /// arch/x86/lib/cmdline.c). <paramref name="omitted"/> lists hidden features no parameter could express.
    /// </summary>
    public static string AdjustCommandLine(string commandLine, CpuTemplate template, out IReadOnlyList<CpuidBit> omitted)
    {
        var words = commandLine.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        var add = new List<string>();
        foreach (string argument in CpuTemplate.Pvm.Union(template).LinuxKernelArguments(out omitted).Split(' ', StringSplitOptions.RemoveEmptyEntries))
        {
            bool given = argument.StartsWith("clearcpuid=", StringComparison.Ordinal)
                ? words.Any(w => w.StartsWith("clearcpuid=", StringComparison.Ordinal))
                : words.Contains(argument);
            if (!given)
                add.Add(argument);
        }
        return add.Count == 0 ? commandLine : $"{commandLine} {string.Join(' ', add)}";
    }

    /// <summary>As <see cref="AdjustCommandLine(string, CpuTemplate, out IReadOnlyList{CpuidBit})"/>, and
    /// one line on <paramref name="diagnostics"/> naming the features that stay visible.</summary>
    public static string AdjustCommandLine(string commandLine, CpuTemplate template, TextWriter diagnostics)
    {
        string adjusted = AdjustCommandLine(commandLine, template, out var omitted);
        if (omitted.Count > 0)
            diagnostics.WriteLine($"kvmsharp: PVM host: no kernel parameter hides {string.Join(", ", omitted)}; the guest still sees them");
        return adjusted;
    }

    /// <summary>
    /// Handles KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION. Returns true when the vCPU can
    /// go on; false leaves the failure to the caller (register dump, exit code 5).
    /// </summary>
    public unsafe bool TryHandleEmulationFailure(ref kvm_run run)
    {
        _vcpu.GetRegisters(out var regs);
        _vcpu.GetSpecialRegisters(out var sregs);

        int length = 0;
        if ((run.emulation_failure_flags & KvmConstants.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 && run.internal_ndata >= 3)
        {
            length = Math.Min((int)run.emulation_failure_insn_size, 15);
            for (int i = 0; i < length; i++)
                _reader.Buffer[i] = run.emulation_failure_insn_bytes[i];
        }
        if (length == 0)
        {
            if (!GuestPageWalker.TryReadVirtual(_memory, sregs, GuestPageWalker.CodeAddress(sregs, regs.rip), _reader.Buffer))
                return false;
            length = 15;
        }

        // Our own #PF-entry hook: this int3 was placed by Poll().
        if (_reader.Buffer[0] == 0xCC && _hook.IsInstalled && regs.rip == _hook.HandlerVirtual)
            return OnPageFaultHook(ref regs, ref sregs);

        if (GuestPageWalker.Bitness(sregs) != 64)
            return false; // Linux hits these only in 64-bit code; anything else is a real failure.
        _reader.Reset(length);
        _decoder64.IP = regs.rip;
        _decoder64.Decode(out var instr);
        if (instr.IsInvalid)
            return false;

        switch (instr.Mnemonic)
        {
            case Mnemonic.Int3:
                // The kernel's int3_selftest and text_poke_bp: deliver #BP as the CPU would (trap: RIP after int3).
                regs.rip += (ulong)instr.Length;
                _vcpu.SetRegisters(regs);
                InjectException(3);
                break;
            case Mnemonic.Wait:
                // fwait: no x87 exception is ever left unmasked and pending by Linux; complete it.
                regs.rip += (ulong)instr.Length;
                _vcpu.SetRegisters(regs);
                break;
            case Mnemonic.Clac:
                regs.rflags &= ~RFLAGS_AC;
                regs.rip += (ulong)instr.Length;
                _vcpu.SetRegisters(regs);
                break;
            case Mnemonic.Stac:
                regs.rflags |= RFLAGS_AC;
                regs.rip += (ulong)instr.Length;
                _vcpu.SetRegisters(regs);
                break;
            case Mnemonic.Popcnt when instr.Op1Kind == OpKind.Register:
                {
                    ulong src = ReadRegister(regs, instr.Op1Register);
                    ulong count = (ulong)ulong.PopCount(src);
                    WriteRegister(ref regs, instr.Op0Register, count);
                    // SDM: OF, SF, AF, CF, PF cleared; ZF set when the source is 0.
                    regs.rflags &= ~0x8D5UL;
                    if (src == 0)
                        regs.rflags |= 0x40;
                    regs.rip += (ulong)instr.Length;
                    _vcpu.SetRegisters(regs);
                    break;
                }
            default:
                return false;
        }
        EmulatedInstructions++;
        return true;
    }

    private bool OnPageFaultHook(ref kvm_regs regs, ref kvm_sregs sregs)
    {
        PageFaultHookHits++;
        // #PF pushed: error code, RIP, CS, RFLAGS, RSP, SS (SDM vol. 3 §6.14.2).
        if (!GuestPageWalker.TryReadVirtual(_memory, sregs, regs.rsp, _frame))
            return false;
        var f = _frame.AsSpan();
        ulong faultRip = BitConverter.ToUInt64(f[8..]);
        ulong faultCs = BitConverter.ToUInt64(f[16..]);
        ulong faultRflags = BitConverter.ToUInt64(f[24..]);
        ulong faultRsp = BitConverter.ToUInt64(f[32..]);

        if ((faultCs & 3) == 3 && ReadSyscallMsrs(out ulong star, out ulong lstar, out ulong mask) && faultRip == lstar && lstar != 0)
        {
            TryCompleteSyscall(ref regs, ref sregs, star, lstar, mask, faultRflags, faultRsp);
            return true;
        }

        // An ordinary page fault: execute the hooked instruction (endbr64, nop or clac) and go on.
        regs.rip += (ulong)_hook.InstructionLength;
        if (_hook.IsClac)
            regs.rflags &= ~RFLAGS_AC;
        _vcpu.SetRegisters(regs);
        return true;
    }

    /// <summary>
    /// The syscall entry the CPU should have made (SDM vol. 2 SYSCALL): CS = STAR[47:32], SS = CS + 8,
    /// CPL 0, RIP = LSTAR, RFLAGS &amp;= ~SYSCALL_MASK. RCX and R11 were already set by the host; RSP is the
    /// user's, from the fault frame (syscall does not switch stacks).
    /// </summary>
    private void TryCompleteSyscall(ref kvm_regs regs, ref kvm_sregs sregs, ulong star, ulong lstar, ulong mask, ulong userRflags, ulong userRsp)
    {
        ushort kernelCs = (ushort)((star >> 32) & 0xFFFC);
        sregs.cs = new kvm_segment { selector = kernelCs, @base = 0, limit = 0xFFFFFFFF, type = 11, present = 1, dpl = 0, s = 1, l = 1, db = 0, g = 1 };
        sregs.ss = new kvm_segment { selector = (ushort)(kernelCs + 8), @base = 0, limit = 0xFFFFFFFF, type = 3, present = 1, dpl = 0, s = 1, l = 0, db = 1, g = 1 };
        _vcpu.SetSpecialRegisters(sregs);
        regs.rip = lstar;
        regs.rsp = userRsp;
        regs.rflags = (userRflags & ~mask) | 2;
        _vcpu.SetRegisters(regs);
        SyscallsCompleted++;
    }

    private bool ReadSyscallMsrs(out ulong star, out ulong lstar, out ulong mask)
    {
        _msrs[0] = new kvm_msr_entry { index = MSR_STAR };
        _msrs[1] = new kvm_msr_entry { index = MSR_LSTAR };
        _msrs[2] = new kvm_msr_entry { index = MSR_SYSCALL_MASK };
        bool ok = _vcpu.GetMsrs(_msrs) == 3;
        star = _msrs[0].data;
        lstar = _msrs[1].data;
        mask = _msrs[2].data;
        return ok;
    }

    /// <summary>
    /// Called on vCPU 0 from time to time (each kick): once the guest kernel has its final IDT and
    /// LSTAR, place an int3 on the first instruction of its #PF handler, and put it back if the kernel
    /// rewrote that instruction (alternatives patching).
    /// </summary>
    public void Poll()
    {
        _vcpu.GetSpecialRegisters(out var sregs);
        if (Trace)
        {
            _vcpu.GetRegisters(out var r);
            System.Console.Error.WriteLine($"[pvm] rip={r.rip:x} cpl={sregs.cs.selector & 3} hook={_hook.IsInstalled}@{_hook.HandlerVirtual:x} emulated={EmulatedInstructions} syscalls={SyscallsCompleted} pf={PageFaultHookHits}");
        }
        if ((sregs.efer & (1UL << 10)) == 0 || sregs.idt.limit < 14 * 16 + 15)
            return;
        if (!ReadSyscallMsrs(out _, out ulong lstar, out _) || lstar == 0)
            return;
        Span<byte> gate = stackalloc byte[16];
        if (!GuestPageWalker.TryReadVirtual(_memory, sregs, sregs.idt.@base + 14 * 16, gate))
            return;
        ulong handler = BitConverter.ToUInt16(gate) | ((ulong)BitConverter.ToUInt16(gate[6..]) << 16) | ((ulong)BitConverter.ToUInt32(gate[8..]) << 32);
        if (!GuestPageWalker.TryTranslate(_memory, sregs, handler, out ulong gpa))
            return;
        _hook.TryInstall(_memory, handler, gpa, _reader, _decoder64);
    }

    private void InjectException(byte vector)
    {
        _vcpu.GetVcpuEvents(out var ev);
        ev.exception_injected = 1;
        ev.exception_nr = vector;
        ev.exception_has_error_code = 0;
        ev.exception_error_code = 0;
        ev.flags = 0;
        _vcpu.SetVcpuEvents(ev);
    }

    private static ulong ReadRegister(in kvm_regs r, Register reg) => reg.GetFullRegister() switch
    {
        Register.RAX => Mask(r.rax, reg), Register.RBX => Mask(r.rbx, reg), Register.RCX => Mask(r.rcx, reg), Register.RDX => Mask(r.rdx, reg),
        Register.RSI => Mask(r.rsi, reg), Register.RDI => Mask(r.rdi, reg), Register.RBP => Mask(r.rbp, reg), Register.RSP => Mask(r.rsp, reg),
        Register.R8 => Mask(r.r8, reg), Register.R9 => Mask(r.r9, reg), Register.R10 => Mask(r.r10, reg), Register.R11 => Mask(r.r11, reg),
        Register.R12 => Mask(r.r12, reg), Register.R13 => Mask(r.r13, reg), Register.R14 => Mask(r.r14, reg), Register.R15 => Mask(r.r15, reg),
        _ => throw new System.Diagnostics.UnreachableException(),
    };

    private static ulong Mask(ulong v, Register reg) => reg.GetSize() switch { 2 => v & 0xFFFF, 4 => v & 0xFFFF_FFFF, _ => v };

    private static void WriteRegister(ref kvm_regs r, Register reg, ulong value)
    {
        // 32-bit destinations zero-extend; 16-bit ones keep the upper bits (SDM vol. 1 §3.4.1.1).
        ref ulong slot = ref Slot(ref r, reg.GetFullRegister());
        slot = reg.GetSize() switch { 2 => (slot & ~0xFFFFUL) | (value & 0xFFFF), 4 => value & 0xFFFF_FFFF, _ => value };
    }

    private static ref ulong Slot(ref kvm_regs r, Register full)
    {
        switch (full)
        {
            case Register.RAX: return ref r.rax;
            case Register.RBX: return ref r.rbx;
            case Register.RCX: return ref r.rcx;
            case Register.RDX: return ref r.rdx;
            case Register.RSI: return ref r.rsi;
            case Register.RDI: return ref r.rdi;
            case Register.RBP: return ref r.rbp;
            case Register.RSP: return ref r.rsp;
            case Register.R8: return ref r.r8;
            case Register.R9: return ref r.r9;
            case Register.R10: return ref r.r10;
            case Register.R11: return ref r.r11;
            case Register.R12: return ref r.r12;
            case Register.R13: return ref r.r13;
            case Register.R14: return ref r.r14;
            case Register.R15: return ref r.r15;
            default: throw new System.Diagnostics.UnreachableException();
        }
    }
}

/// <summary>The int3 hook on the guest's #PF entry, shared by all vCPUs of a VM.</summary>
internal sealed class PvmHook
{
    private readonly Lock _lock = new();

    public bool IsInstalled { get; private set; }
    public ulong HandlerVirtual { get; private set; }
    public ulong HandlerPhysical { get; private set; }
    public int InstructionLength { get; private set; }
    public bool IsClac { get; private set; }
    public int Installs { get; private set; }

    /// <summary>Installs (or re-installs after the guest rewrote it) the hook; returns true when it is in place.</summary>
    public bool TryInstall(GuestMemory memory, ulong handlerVirtual, ulong handlerPhysical, ReusableCodeReader reader, Decoder decoder)
    {
        lock (_lock)
        {
            if (!memory.TryRead(new GuestAddress(handlerPhysical), reader.Buffer))
                return false;
            if (IsInstalled && HandlerPhysical == handlerPhysical && reader.Buffer[0] == 0xCC)
                return true;
            reader.Reset(15);
            decoder.IP = handlerVirtual;
            decoder.Decode(out var instr);
            // Only instructions whose whole effect we can reproduce: endbr64 / nop (no effect) or clac.
            bool clac = instr.Mnemonic == Mnemonic.Clac;
            if (instr.IsInvalid || !(clac || instr.Mnemonic is Mnemonic.Nop or Mnemonic.Endbr64))
                return false;
            HandlerVirtual = handlerVirtual;
            HandlerPhysical = handlerPhysical;
            InstructionLength = instr.Length;
            IsClac = clac;
            ReadOnlySpan<byte> int3 = [0xCC];
            if (!memory.TryWrite(new GuestAddress(handlerPhysical), int3))
                return false;
            IsInstalled = true;
            Installs++;
            return true;
        }
    }
}
