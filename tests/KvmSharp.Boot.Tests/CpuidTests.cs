using Xunit;

namespace KvmSharp.Boot.Tests;

public class CpuidTests
{
    private const uint Sig = CpuidEntry.FlagSignificantIndex;

    /// <summary>A plausible KVM_GET_SUPPORTED_CPUID list for an Intel host.</summary>
    private static CpuidEntry[] Intel() =>
    [
        new(0, 0, 0, 0x1f, 0x756e6547, 0x6c65746e, 0x49656e69), // GenuineIntel
        new(1, 0, 0, 0x000906ea, 0x00ff0800 | 0x3f000000, 0x7ffafbff & ~(1u << 31), 0xbfebfbff),
        new(4, 0, Sig, 0x1c004121, 0x01c0003f, 0x3f, 0),
        new(4, 1, Sig, 0x1c004122, 0x01c0003f, 0x3f, 0),
        new(4, 2, Sig, 0x1c004143, 0x00c0003f, 0x3ff, 0),
        new(4, 3, Sig, 0x1c03c163, 0x03c0003f, 0x2fff, 6),
        new(4, 4, Sig, 0, 0, 0, 0),
        new(6, 0, 0, 0x4, 0, 1, 0),
        new(7, 0, Sig, 0, 0x029c6fbf, 0x40000000 | (1 << 3) | (1 << 4), 0xbc000400),
        new(7, 1, Sig, 0x30, 0, 0, 0),
        new(0xB, 0, Sig, 1, 2, 0x100, 7),
        new(0xB, 1, Sig, 4, 12, 0x201, 7),
        new(0xD, 0, Sig, 0x7, 0x340, 0x340, 0),
        new(0xD, 1, Sig, 0xf, 0x340, 0, 0),
        new(0x1F, 0, Sig, 1, 2, 0x100, 7),
        new(0x40000000, 0, 0, 0x40000001, 0x4b4d564b, 0x564b4d56, 0x4d),
        new(0x40000001, 0, 0, 0x01007afb, 0, 0, 0),
        new(0x80000001, 0, 0, 0, 0, 0x121, 0x2c100800),
        new(0x80000008, 0, 0, 0x3027, 0, 0, 0),
    ];

    private static CpuidEntry One(CpuidEntry[] t, uint f, uint i = 0) => t.Single(e => e.Function == f && e.Index == i);

    [Theory]
    [InlineData(0, 1)]
    [InlineData(0, 4)]
    [InlineData(3, 4)]
    [InlineData(5, 6)]
    [InlineData(253, 254)]
    public void Leaf1_has_apic_id_logical_count_htt_and_hypervisor(int vcpu, int cpus)
    {
        var t = CpuidShaper.ForVcpu(Intel(), vcpu, cpus, CpuTemplate.None);
        var l1 = One(t, 1);
        Assert.Equal((uint)vcpu, l1.Ebx >> 24);
        uint logical = (l1.Ebx >> 16) & 0xff;
        Assert.True(logical >= (uint)cpus && System.Numerics.BitOperations.IsPow2(logical) || logical == 255);
        Assert.Equal(0x08u, (l1.Ebx >> 8) & 0xff); // CLFLUSH line size kept
        Assert.Equal(cpus > 1, (l1.Edx & (1u << 28)) != 0);
        Assert.True((l1.Ecx & (1u << 31)) != 0);
        Assert.Equal(Intel()[1].Eax, l1.Eax);
    }

    [Fact]
    public void Leaf_0b_describes_one_thread_per_core_and_cpu_count_cores()
    {
        var t = CpuidShaper.ForVcpu(Intel(), 5, 6, CpuTemplate.None);
        var smt = One(t, 0xB, 0);
        var core = One(t, 0xB, 1);
        var end = One(t, 0xB, 2);
        Assert.Equal(3, t.Count(e => e.Function == 0xB));
        Assert.Equal((0u, 1u, 0x100u, 5u), (smt.Eax, smt.Ebx, smt.Ecx, smt.Edx));
        Assert.Equal((3u, 6u, 0x201u, 5u), (core.Eax, core.Ebx, core.Ecx, core.Edx)); // ceil(log2 6) = 3
        Assert.Equal((0u, 0u, 2u, 5u), (end.Eax, end.Ebx, end.Ecx, end.Edx));
        Assert.All(t.Where(e => e.Function == 0xB), e => Assert.Equal(Sig, e.Flags & Sig));
        // 0x1F present in the supported list: same topology.
        Assert.Equal(core, One(t, 0x1F, 1) with { Function = 0xB });
    }

    [Theory]
    [InlineData(1, 0)]
    [InlineData(2, 1)]
    [InlineData(4, 2)]
    [InlineData(5, 3)]
    [InlineData(128, 7)]
    [InlineData(129, 8)]
    public void Core_level_shift_is_ceil_log2(int cpus, uint shift)
    {
        var t = CpuidShaper.ForVcpu(Intel(), 0, cpus, CpuTemplate.None);
        Assert.Equal(shift, One(t, 0xB, 1).Eax);
        Assert.Equal((uint)cpus, One(t, 0xB, 1).Ebx);
    }

    [Fact]
    public void Leaf_0b_is_not_invented_when_absent()
    {
        var t = CpuidShaper.ForVcpu(Intel().Where(e => e.Function != 0xB && e.Function != 0x1F).ToArray(), 0, 2, CpuTemplate.None);
        Assert.DoesNotContain(t, e => e.Function is 0xB or 0x1F);
    }

    [Fact]
    public void Leaf4_reports_cores_and_sharing()
    {
        var t = CpuidShaper.ForVcpu(Intel(), 1, 4, CpuTemplate.None);
        foreach (uint i in new uint[] { 0, 1, 2 })
        {
            var e = One(t, 4, i);
            Assert.Equal(3u, e.Eax >> 26);
            Assert.Equal(0u, (e.Eax >> 14) & 0xfff);
            Assert.Equal(Intel().Single(x => x.Function == 4 && x.Index == i).Eax & 0x3fff, e.Eax & 0x3fff);
        }
        var l3 = One(t, 4, 3);
        Assert.Equal(3u, (l3.Eax >> 14) & 0xfff);
        Assert.Equal(3u, l3.Eax >> 26);
        Assert.Equal(0u, One(t, 4, 4).Eax);
    }

    [Fact]
    public void Leaf6_is_cleared_and_kvm_leaves_are_kept()
    {
        var t = CpuidShaper.ForVcpu(Intel(), 0, 1, CpuTemplate.None);
        Assert.Equal(new CpuidEntry(6, 0, 0, 0, 0, 0, 0), One(t, 6));
        Assert.Equal(Intel().Single(e => e.Function == 0x40000000), One(t, 0x40000000));
        Assert.Equal(Intel().Single(e => e.Function == 0x40000001), One(t, 0x40000001));
        Assert.Equal(Intel().Single(e => e.Function == 0xD && e.Index == 1), One(t, 0xD, 1));
    }

    [Fact]
    public void Amd_leaf_80000008_reports_core_count()
    {
        var amd = Intel().Select(e => e.Function == 0 ? e with { Ebx = 0x68747541, Edx = 0x69746e65, Ecx = 0x444d4163 } : e).ToArray();
        var t = CpuidShaper.ForVcpu(amd, 0, 6, CpuTemplate.None);
        var e = One(t, 0x80000008);
        Assert.Equal(5u, e.Ecx & 0xff);
        Assert.Equal(3u, (e.Ecx >> 12) & 0xf);
        Assert.Equal(0x3027u, e.Eax);
        Assert.Equal(0u, One(CpuidShaper.ForVcpu(Intel(), 0, 6, CpuTemplate.None), 0x80000008).Ecx); // untouched on Intel
    }

    [Fact]
    public void Amd_leaf_8000001e_gives_each_vcpu_its_own_compute_unit()
    {
        var amd = Intel().Select(e => e.Function == 0 ? e with { Ebx = 0x68747541, Edx = 0x69746e65, Ecx = 0x444d4163 } : e)
            .Append(new CpuidEntry(0x8000001E, 0, 0, 7, 0x0107, 0x0103, 0)).ToArray();
        var e = One(CpuidShaper.ForVcpu(amd, 3, 4, CpuTemplate.None), 0x8000001E);
        Assert.Equal((3u, 3u, 0u, 0u), (e.Eax, e.Ebx, e.Ecx, e.Edx));
    }

    [Fact]
    public void Bad_arguments_are_rejected()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => CpuidShaper.ForVcpu(Intel(), 2, 2, CpuTemplate.None));
        Assert.Throws<ArgumentOutOfRangeException>(() => CpuidShaper.ForVcpu(Intel(), -1, 2, CpuTemplate.None));
        Assert.Throws<ArgumentOutOfRangeException>(() => CpuidShaper.ForVcpu(Intel(), 0, 0, CpuTemplate.None));
        Assert.Throws<ArgumentOutOfRangeException>(() => CpuidShaper.ForVcpu(Intel(), 0, 255, CpuTemplate.None));
    }

    [Fact]
    public void Minimal_template_hides_avx_xsave_tsx_and_leaf_d()
    {
        var t = CpuidShaper.ForVcpu(Intel(), 0, 2, CpuTemplate.Minimal);
        var l1 = One(t, 1);
        Assert.Equal(0u, l1.Ecx & ((1u << 28) | (1u << 26) | (1u << 27) | (1u << 12) | (1u << 29)));
        Assert.NotEqual(0u, l1.Ecx & (1u << 23)); // popcnt stays
        var l7 = One(t, 7, 0);
        Assert.Equal(0u, l7.Ebx & ((1u << 5) | (1u << 4) | (1u << 11) | (1u << 16)));
        Assert.NotEqual(0u, l7.Ebx & (1u << 20)); // smap stays
        Assert.Equal(0u, l7.Ecx & ((1u << 3) | (1u << 4)));
        Assert.Equal(0u, One(t, 7, 1).Eax & 0x30);
        Assert.All(t.Where(e => e.Function == 0xD), e => Assert.Equal((0u, 0u, 0u, 0u), (e.Eax, e.Ebx, e.Ecx, e.Edx)));
        Assert.Equal(0u, One(t, 0x80000001).Ecx & ((1u << 16) | (1u << 11)));
    }

    [Fact]
    public void Pvm_template_also_hides_popcnt_smap_rdrand()
    {
        var t = CpuidShaper.ForVcpu(Intel(), 0, 1, CpuTemplate.Pvm);
        Assert.Equal(0u, One(t, 1).Ecx & ((1u << 23) | (1u << 30) | (1u << 25)));
        Assert.Equal(0u, One(t, 7, 0).Ebx & ((1u << 20) | (1u << 18) | (1u << 29)));
        Assert.Equal(0u, One(t, 0x80000001).Edx & (1u << 27));
    }

    [Fact]
    public void Explicit_bits_and_leaves_are_removed()
    {
        var tpl = CpuTemplate.Parse("0x7.0:ebx:5, -popcnt, 0x80000001:edx:11, 0x6, 7.1");
        var t = CpuidShaper.ForVcpu(Intel(), 0, 1, tpl);
        Assert.Equal(0u, One(t, 7, 0).Ebx & (1u << 5));
        Assert.NotEqual(0u, One(t, 7, 0).Ebx & (1u << 3));
        Assert.Equal(0u, One(t, 1).Ecx & (1u << 23));
        Assert.Equal(0u, One(t, 0x80000001).Edx & (1u << 11));
        Assert.Equal(0u, One(t, 7, 1).Eax);
    }
}

public class CpuTemplateTests
{
    [Fact]
    public void Named_sets_parse()
    {
        Assert.Same(CpuTemplate.None, CpuTemplate.Parse(null));
        Assert.Same(CpuTemplate.None, CpuTemplate.Parse("  "));
        Assert.Empty(CpuTemplate.Parse("none").RemovedBits);
        Assert.Equal(CpuTemplate.Minimal.RemovedBits, CpuTemplate.Parse("minimal").RemovedBits);
        Assert.Equal(CpuTemplate.Minimal.ClearedLeaves, CpuTemplate.Parse("Minimal").ClearedLeaves);
        Assert.True(CpuTemplate.Pvm.RemovedBits.Count > CpuTemplate.Minimal.RemovedBits.Count);
    }

    [Fact]
    public void Union_hides_what_either_hides()
    {
        Assert.Same(CpuTemplate.Pvm, CpuTemplate.Pvm.Union(CpuTemplate.None));
        Assert.Same(CpuTemplate.Minimal, CpuTemplate.None.Union(CpuTemplate.Minimal));
        var u = CpuTemplate.Minimal.Union(CpuTemplate.Parse("popcnt,0x6"));
        Assert.Equal("minimal,popcnt,0x6", u.Name);
        Assert.Superset(CpuTemplate.Minimal.RemovedBits.ToHashSet(), u.RemovedBits.ToHashSet());
        Assert.Contains(u.RemovedBits, b => b.Name == "popcnt");
        Assert.Equal([new CpuidLeaf(0xD, null), new CpuidLeaf(6, null)], u.ClearedLeaves);
        Assert.Equal(CpuTemplate.Pvm.RemovedBits.Count, CpuTemplate.Pvm.Union(CpuTemplate.Minimal).RemovedBits.Count);
    }

    [Fact]
    public void Pvm_template_hides_cx16()
    {
        // SLUB's lock cmpxchg16b is not emulated by a PVM host (docs/pvm.md).
        Assert.Contains(CpuTemplate.Pvm.RemovedBits, b => b.Name == "cx16");
        Assert.Contains("141", CpuTemplate.Pvm.LinuxKernelArguments().Split('=')[1].Split(','));
    }

    [Fact]
    public void Explicit_items_parse()
    {
        var t = CpuTemplate.Parse("minimal,avx2,0x7.0:ebx:20,1:ecx:23,0xd.1,-sha-ni");
        Assert.Contains(new CpuidBit(7, 0, CpuidRegister.Ebx, 20), t.RemovedBits);
        Assert.Contains(new CpuidBit(1, null, CpuidRegister.Ecx, 23), t.RemovedBits);
        Assert.Contains(new CpuidLeaf(0xD, 1), t.ClearedLeaves);
        Assert.Contains(t.RemovedBits, b => b.Name == "sha_ni");
        Assert.Equal(t.RemovedBits.Count, t.RemovedBits.Distinct().Count());
    }

    [Fact]
    public void Removing_xsave_removes_osxsave_and_leaf_d()
    {
        var t = CpuTemplate.Parse("xsave");
        Assert.Contains(t.RemovedBits, b => b.Name == "osxsave");
        Assert.Contains(new CpuidLeaf(0xD, null), t.ClearedLeaves);
    }

    [Theory]
    [InlineData("nosuchfeature")]
    [InlineData("0x7.0:ebx:32")]
    [InlineData("0x7.0:exx:3")]
    [InlineData("0x7.0:ebx")]
    [InlineData("0xzz")]
    [InlineData("7.x:eax:1")]
    public void Bad_items_are_rejected(string text) => Assert.Throws<FormatException>(() => CpuTemplate.Parse(text));

    [Fact]
    public void Kernel_arguments_use_linux_feature_numbers()
    {
        Assert.Equal("", CpuTemplate.None.LinuxKernelArguments());
        // popcnt = word 4 bit 23 = 151; smap = word 9 bit 20 = 308; rdtscp = word 1 bit 27 = 59.
        Assert.Equal("clearcpuid=59,151,308", CpuTemplate.Parse("smap,popcnt,rdtscp").LinuxKernelArguments());
        string pvm = CpuTemplate.Pvm.LinuxKernelArguments(out var omitted);
        Assert.StartsWith("noxsave clearcpuid=", pvm);
        Assert.Empty(omitted);
        string[] numbers = pvm.Split('=')[1].Split(',');
        Assert.True(pvm.Split('=')[1].Length <= CpuTemplate.LinuxClearCpuidMaxLength);
        Assert.Contains("151", numbers);  // popcnt
        Assert.Contains("308", numbers);  // smap
        Assert.DoesNotContain("156", numbers); // avx: noxsave clears it
        // A bit in a register Linux has no word for is reported as omitted.
        Assert.Equal("", CpuTemplate.Parse("0x6:eax:1").LinuxKernelArguments(out omitted));
        Assert.Single(omitted);
        // Without xsave removed, AVX needs its own number.
        Assert.Equal("clearcpuid=156", CpuTemplate.Parse("avx").LinuxKernelArguments());
        // Too many numbers for Linux's 127-character buffer: the rest are omitted, not silently dropped.
        var many = CpuTemplate.Parse(string.Join(',', Enumerable.Range(0, 32).Select(b => $"7.0:ebx:{b}").Concat(Enumerable.Range(0, 32).Select(b => $"7.0:ecx:{b}"))));
        string args = many.LinuxKernelArguments(out omitted);
        Assert.True(args.Length - "clearcpuid=".Length <= 127);
        Assert.NotEmpty(omitted);
        Assert.Equal(64, args.Split('=')[1].Split(',').Length + omitted.Count);
    }
}

public class BootMsrsTests
{
    [Fact]
    public void Defaults_match_the_boot_contract()
    {
        var d = BootMsrs.Defaults.ToDictionary(x => x.Index, x => x.Value);
        Assert.Equal(0x806UL, d[0x2ff]);
        Assert.Equal(1UL, d[0x1a0]);
        foreach (uint z in new uint[] { 0x174, 0x175, 0x176, 0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, 0xc0000102, 0x10 })
            Assert.Equal(0UL, d[z]);
        Assert.False(d.ContainsKey(0x10a)); // IA32_ARCH_CAPABILITIES fails on PVM
        Assert.Equal(11, d.Count);
    }
}
