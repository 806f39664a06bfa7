using Xunit;
using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using KvmSharp.Kvm.Native;

namespace KvmSharp.Kvm.Tests;

/// <summary>
/// Compares every Native struct with the host's &lt;linux/kvm.h&gt;: a C probe prints sizeof and
/// offsetof, compiled with gcc in the test (style.md §7).
/// </summary>
public class AbiLayoutTests
{
    private static readonly Lazy<Dictionary<string, long>> CLayout = new(BuildProbe);

    private static Dictionary<string, long> BuildProbe()
    {
        var dir = Directory.CreateTempSubdirectory("kvmsharp-abi");
        string c = Path.Combine(dir.FullName, "probe.c");
        File.WriteAllText(c, """
            #include <stdio.h>
            #include <stddef.h>
            #include <linux/kvm.h>
            #define S(t) printf("sizeof %s %zu\n", #t, sizeof(struct t));
            #define O(t, f, n) printf("offsetof %s.%s %zu\n", #t, n, offsetof(struct t, f));
            int main(void) {
              S(kvm_run) S(kvm_regs) S(kvm_sregs) S(kvm_segment) S(kvm_dtable) S(kvm_userspace_memory_region)
              S(kvm_cpuid_entry2) S(kvm_msr_entry) S(kvm_pit_config) S(kvm_irqfd) S(kvm_ioeventfd) S(kvm_irq_level)
              S(kvm_vcpu_events) S(kvm_lapic_state) S(kvm_guest_debug) S(kvm_enable_cap) S(kvm_irq_routing_entry) S(kvm_mp_state) S(kvm_msi)
              O(kvm_run, exit_reason, "exit_reason") O(kvm_run, io.port, "io_port") O(kvm_run, io.data_offset, "io_data_offset")
              O(kvm_run, mmio.phys_addr, "mmio_phys_addr") O(kvm_run, mmio.data, "mmio_data") O(kvm_run, mmio.len, "mmio_len")
              O(kvm_run, mmio.is_write, "mmio_is_write") O(kvm_run, internal.suberror, "internal_suberror")
              O(kvm_run, internal.data, "internal_data") O(kvm_run, emulation_failure.flags, "emulation_failure_flags")
              O(kvm_run, emulation_failure.insn_size, "emulation_failure_insn_size")
              O(kvm_run, emulation_failure.insn_bytes, "emulation_failure_insn_bytes")
              O(kvm_run, system_event.type, "system_event_type") O(kvm_run, system_event.data, "system_event_data")
              O(kvm_run, fail_entry.cpu, "fail_entry_cpu") O(kvm_run, debug.arch.pc, "debug_pc") O(kvm_run, kvm_valid_regs, "kvm_valid_regs")
              O(kvm_run, immediate_exit, "immediate_exit") O(kvm_run, cr8, "cr8") O(kvm_run, apic_base, "apic_base")
              O(kvm_sregs, cr0, "cr0") O(kvm_sregs, efer, "efer") O(kvm_sregs, interrupt_bitmap, "interrupt_bitmap") O(kvm_sregs, gdt, "gdt")
              O(kvm_vcpu_events, sipi_vector, "sipi_vector") O(kvm_vcpu_events, exception_payload, "exception_payload")
              O(kvm_vcpu_events, exception_has_payload, "exception_has_payload") O(kvm_vcpu_events, nmi, "nmi_injected")
              O(kvm_ioeventfd, fd, "fd") O(kvm_ioeventfd, flags, "flags") O(kvm_irq_routing_entry, u, "irqchip_irqchip")
              O(kvm_guest_debug, arch, "debugreg") O(kvm_segment, selector, "selector") O(kvm_segment, unusable, "unusable")
              return 0;
            }
            """);
        string exe = Path.Combine(dir.FullName, "probe");
        Run("gcc", $"-o {exe} {c}");
        var result = new Dictionary<string, long>();
        foreach (var line in Run(exe, "").Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            var parts = line.Split(' ');
            result[parts[0] + " " + parts[1]] = long.Parse(parts[2]);
        }
        return result;
    }

    private static string Run(string file, string args)
    {
        var psi = new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true };
        using var p = Process.Start(psi)!;
        string output = p.StandardOutput.ReadToEnd();
        string err = p.StandardError.ReadToEnd();
        p.WaitForExit();
        if (p.ExitCode != 0)
            throw new InvalidOperationException($"{file} failed: {err}");
        return output;
    }

    private static void SkipWithoutGcc()
    {
        if (!File.Exists("/usr/bin/gcc") || !File.Exists("/usr/include/linux/kvm.h"))
            Assert.Skip("gcc or <linux/kvm.h> is not installed; install gcc and linux-libc-dev");
    }

    public static TheoryData<string> Structs() => new()
    {
        "kvm_run", "kvm_regs", "kvm_sregs", "kvm_segment", "kvm_dtable", "kvm_userspace_memory_region",
        "kvm_cpuid_entry2", "kvm_msr_entry", "kvm_pit_config", "kvm_irqfd", "kvm_ioeventfd", "kvm_irq_level",
        "kvm_vcpu_events", "kvm_lapic_state", "kvm_guest_debug", "kvm_enable_cap", "kvm_irq_routing_entry", "kvm_mp_state", "kvm_msi",
    };

    [Theory]
    [MemberData(nameof(Structs))]
    public void StructSizeMatchesHeader(string name)
    {
        SkipWithoutGcc();
        var type = typeof(kvm_run).Assembly.GetType("KvmSharp.Kvm.Native." + name)!;
        Assert.Equal(CLayout.Value["sizeof " + name], (long)SizeOf(type));
    }

    [Theory]
    [InlineData("kvm_run", "exit_reason")]
    [InlineData("kvm_run", "immediate_exit")]
    [InlineData("kvm_run", "cr8")]
    [InlineData("kvm_run", "apic_base")]
    [InlineData("kvm_run", "io_port")]
    [InlineData("kvm_run", "io_data_offset")]
    [InlineData("kvm_run", "mmio_phys_addr")]
    [InlineData("kvm_run", "mmio_data")]
    [InlineData("kvm_run", "mmio_len")]
    [InlineData("kvm_run", "mmio_is_write")]
    [InlineData("kvm_run", "internal_suberror")]
    [InlineData("kvm_run", "internal_data")]
    [InlineData("kvm_run", "emulation_failure_flags")]
    [InlineData("kvm_run", "emulation_failure_insn_size")]
    [InlineData("kvm_run", "emulation_failure_insn_bytes")]
    [InlineData("kvm_run", "system_event_type")]
    [InlineData("kvm_run", "system_event_data")]
    [InlineData("kvm_run", "fail_entry_cpu")]
    [InlineData("kvm_run", "debug_pc")]
    [InlineData("kvm_run", "kvm_valid_regs")]
    [InlineData("kvm_sregs", "cr0")]
    [InlineData("kvm_sregs", "efer")]
    [InlineData("kvm_sregs", "gdt")]
    [InlineData("kvm_sregs", "interrupt_bitmap")]
    [InlineData("kvm_vcpu_events", "sipi_vector")]
    [InlineData("kvm_vcpu_events", "nmi_injected")]
    [InlineData("kvm_vcpu_events", "exception_has_payload")]
    [InlineData("kvm_vcpu_events", "exception_payload")]
    [InlineData("kvm_ioeventfd", "fd")]
    [InlineData("kvm_ioeventfd", "flags")]
    [InlineData("kvm_irq_routing_entry", "irqchip_irqchip")]
    [InlineData("kvm_guest_debug", "debugreg")]
    [InlineData("kvm_segment", "selector")]
    [InlineData("kvm_segment", "unusable")]
    public void FieldOffsetMatchesHeader(string structName, string field)
    {
        SkipWithoutGcc();
        var type = typeof(kvm_run).Assembly.GetType("KvmSharp.Kvm.Native." + structName)!;
        Assert.Equal(CLayout.Value[$"offsetof {structName}.{field}"], (long)Marshal.OffsetOf(type, field));
    }

    private static int SizeOf(Type t) =>
        (int)typeof(Unsafe).GetMethod(nameof(Unsafe.SizeOf))!.MakeGenericMethod(t).Invoke(null, null)!;
}
