using Xunit;
using KvmSharp.Kvm.Native;
using KvmSharp.Memory;

namespace KvmSharp.Kvm.Tests;

/// <summary>Hand-assembled guests on a real vCPU; each asserts the exits KVM reports (kvm-ioctls test_run_code).</summary>
public sealed unsafe class TinyGuestTests
{
    /// <summary>
    /// A KVM test never skips: without /dev/kvm it fails, because scripts/test.sh runs this tier
    /// through scripts/kvm-host.sh (directly, or in the nested KVM host).
    /// </summary>
    internal static void RequireKvm()
    {
        if (!KvmSystem.IsAvailable(out string reason))
            Assert.Fail($"KVM is not usable here: {reason}. Run the KVM tiers through scripts/kvm-host.sh (scripts/test.sh does).");
    }

    [Fact]
    public void ApiVersionIs12AndVcpuMmapSizeIsAtLeastKvmRun()
    {
        RequireKvm();
        using var kvm = KvmSystem.Open();
        Assert.Equal(12, kvm.GetApiVersion());
        Assert.True(kvm.GetVcpuMmapSize() >= sizeof(kvm_run));
        Assert.NotEmpty(kvm.GetSupportedCpuid());
    }

    [Fact]
    public void RealModePortWriteThenHlt()
    {
        RequireKvm();
        using var g = new TinyGuest();
        // mov dx,0x3f8; mov al,'K'; out dx,al; mov al,'S'; out dx,al; hlt
        g.LoadRealMode([0xBA, 0xF8, 0x03, 0xB0, (byte)'K', 0xEE, 0xB0, (byte)'S', 0xEE, 0xF4]);
        var seen = new List<byte>();
        uint exit;
        while ((exit = g.RunOnce()) == KvmConstants.KVM_EXIT_IO)
        {
            ref var run = ref g.Vcpu.RunData;
            Assert.Equal(KvmConstants.KVM_EXIT_IO_OUT, run.io_direction);
            Assert.Equal(0x3f8, run.io_port);
            Assert.Equal(1, run.io_size);
            seen.Add(g.Vcpu.RunBase[run.io_data_offset]);
        }
        Assert.Equal(KvmConstants.KVM_EXIT_HLT, exit);
        Assert.Equal("KS", System.Text.Encoding.ASCII.GetString(seen.ToArray()));
    }

    [Fact]
    public void PortReadReturnsWhatTheVmmSupplies()
    {
        RequireKvm();
        using var g = new TinyGuest();
        // in al,0x60; out 0x80,al; hlt
        g.LoadRealMode([0xE4, 0x60, 0xE6, 0x80, 0xF4]);
        Assert.Equal(KvmConstants.KVM_EXIT_IO, g.RunOnce());
        ref var run = ref g.Vcpu.RunData;
        Assert.Equal(KvmConstants.KVM_EXIT_IO_IN, run.io_direction);
        Assert.Equal(0x60, run.io_port);
        g.Vcpu.RunBase[run.io_data_offset] = 0x5A;
        Assert.Equal(KvmConstants.KVM_EXIT_IO, g.RunOnce());
        Assert.Equal(KvmConstants.KVM_EXIT_IO_OUT, g.Vcpu.RunData.io_direction);
        Assert.Equal(0x80, g.Vcpu.RunData.io_port);
        Assert.Equal(0x5A, g.Vcpu.RunBase[g.Vcpu.RunData.io_data_offset]);
        Assert.Equal(KvmConstants.KVM_EXIT_HLT, g.RunOnce());
    }

    [Fact]
    public void MmioWriteOutsideRamExitsWithAddressAndData()
    {
        RequireKvm();
        using var g = new TinyGuest();
        // mov ax,0xd000; mov ds,ax; mov byte [0x10],0x42 (phys 0xd0010, not RAM: guest has 0x10000 bytes); hlt
        g.LoadRealMode([0xB8, 0x00, 0xD0, 0x8E, 0xD8, 0xC6, 0x06, 0x10, 0x00, 0x42, 0xF4]);
        Assert.Equal(KvmConstants.KVM_EXIT_MMIO, g.RunOnce());
        ref var run = ref g.Vcpu.RunData;
        Assert.Equal(0xd0010UL, run.mmio_phys_addr);
        Assert.Equal(1u, run.mmio_len);
        Assert.Equal(1, run.mmio_is_write);
        Assert.Equal(0x42, run.mmio_data[0]);
        Assert.Equal(KvmConstants.KVM_EXIT_HLT, g.RunOnce());
    }

    [Fact]
    public void LongModeRing3PortWritesExitToUserspace()
    {
        RequireKvm();
        using var g = new TinyGuest();
        // Ring 3, 64-bit: mov dx,0x3f8; mov ecx,3; loop: out dx,al; dec ecx; jnz loop; then a privileged
        // hlt at CPL 3 raises #GP, which with no IDT escalates to a triple fault (KVM_EXIT_SHUTDOWN).
        g.LoadLongMode([0x66, 0xBA, 0xF8, 0x03, 0xB9, 0x03, 0x00, 0x00, 0x00, 0xEE, 0xFF, 0xC9, 0x75, 0xFB, 0xF4], ring3: true);
        int outs = 0;
        uint exit;
        while ((exit = g.RunOnce()) == KvmConstants.KVM_EXIT_IO)
        {
            Assert.Equal(0x3f8, g.Vcpu.RunData.io_port);
            outs++;
        }
        Assert.Equal(3, outs);
        Assert.True(exit is KvmConstants.KVM_EXIT_SHUTDOWN or KvmConstants.KVM_EXIT_INTERNAL_ERROR, $"exit {exit}");
    }

    [Fact]
    public void LongModeRing0PortWriteThenHlt()
    {
        RequireKvm();
        using var g = new TinyGuest();
        // mov dx,0xf4; mov al,0x31; out dx,al; hlt
        g.LoadLongMode([0x66, 0xBA, 0xF4, 0x00, 0xB0, 0x31, 0xEE, 0xF4], ring3: false);
        Assert.Equal(KvmConstants.KVM_EXIT_IO, g.RunOnce());
        Assert.Equal(0xf4, g.Vcpu.RunData.io_port);
        Assert.Equal(0x31, g.Vcpu.RunBase[g.Vcpu.RunData.io_data_offset]);
        Assert.Equal(KvmConstants.KVM_EXIT_HLT, g.RunOnce());
    }
}

/// <summary>A one-vCPU VM with 64 KiB of RAM at 0 (real mode) or 2 MiB identity-mapped (long mode).</summary>
internal sealed unsafe class TinyGuest : IDisposable
{
    public KvmSystem Kvm { get; } = KvmSystem.Open();
    public KvmVm Vm { get; }
    public GuestMemory Memory { get; private set; } = null!;
    public KvmVcpu Vcpu { get; }

    public TinyGuest()
    {
        Vm = Kvm.CreateVm();
        Vcpu = null!;
        Vcpu = Vm.CreateVcpu(0);
    }

    private void MapMemory(ulong size)
    {
        Memory = GuestMemory.CreateAnonymous([(new GuestAddress(0), size)]);
        var r = Memory.Regions[0];
        Vm.SetUserMemoryRegion(0, 0, r.Size, r.HostAddressForKvm);
    }

    public uint RunOnce()
    {
        int rc = Vcpu.Run();
        Assert.Equal(0, rc);
        return Vcpu.RunData.exit_reason;
    }

    public void LoadRealMode(byte[] code)
    {
        MapMemory(0x10000);
        Memory.Write(new GuestAddress(0x1000), code);
        Vcpu.GetSpecialRegisters(out var s);
        s.cs.@base = 0;
        s.cs.selector = 0;
        s.ds.@base = 0;
        s.ds.selector = 0;
        Vcpu.SetSpecialRegisters(s);
        var regs = new kvm_regs { rip = 0x1000, rflags = 2 };
        Vcpu.SetRegisters(regs);
    }

    /// <summary>Identity-maps 2 MiB with one large page; code at 0x10000; ring 3 uses user selectors.</summary>
    public void LoadLongMode(byte[] code, bool ring3)
    {
        MapMemory(0x200000);
        const ulong Pml4 = 0x2000, Pdpt = 0x3000, Pd = 0x4000, Gdt = 0x500;
        ulong user = ring3 ? 4UL : 0UL; // U/S bit
        Memory.Write(new GuestAddress(Pml4), Pdpt | 3 | user);
        Memory.Write(new GuestAddress(Pdpt), Pd | 3 | user);
        Memory.Write(new GuestAddress(Pd), 0x83UL | user); // 2 MiB page, present, writable
        ulong[] gdt = [0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0x00affb000000ffff, 0x00cff3000000ffff];
        for (int i = 0; i < gdt.Length; i++)
            Memory.Write(new GuestAddress(Gdt + (ulong)i * 8), gdt[i]);
        Memory.Write(new GuestAddress(0x10000), code);

        Vcpu.GetSpecialRegisters(out var s);
        byte dpl = (byte)(ring3 ? 3 : 0);
        var cs = new kvm_segment { @base = 0, limit = 0xfffff, selector = (ushort)(ring3 ? 0x18 | 3 : 0x08), type = 11, present = 1, dpl = dpl, s = 1, l = 1, g = 1 };
        var ds = new kvm_segment { @base = 0, limit = 0xfffff, selector = (ushort)(ring3 ? 0x20 | 3 : 0x10), type = 3, present = 1, dpl = dpl, s = 1, db = 1, g = 1 };
        s.cs = cs;
        s.ds = s.es = s.fs = s.gs = s.ss = ds;
        s.gdt.@base = Gdt;
        s.gdt.limit = (ushort)(gdt.Length * 8 - 1);
        s.cr3 = Pml4;
        s.cr4 = 1 << 5;               // PAE
        s.cr0 = 0x80000001 | (1 << 4) | (1 << 16); // PG | PE | ET | WP
        s.efer = (1 << 8) | (1 << 10); // LME | LMA
        Vcpu.SetSpecialRegisters(s);
        // IOPL 3 so ring-3 port I/O is allowed (no TSS I/O bitmap needed).
        var regs = new kvm_regs { rip = 0x10000, rflags = 2 | (ring3 ? 3UL << 12 : 0), rsp = 0x1ff000 };
        Vcpu.SetRegisters(regs);
    }

    public void Dispose()
    {
        Vcpu.Dispose();
        Vm.Dispose();
        Memory?.Dispose();
        Kvm.Dispose();
    }
}
