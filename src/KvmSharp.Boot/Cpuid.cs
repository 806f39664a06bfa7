namespace KvmSharp.Boot;

/// <summary>
/// One CPUID entry as in struct kvm_cpuid_entry2 (kvm.h): function (EAX in), index (ECX in), flags
/// (<see cref="FlagSignificantIndex"/> …), and the four output registers.
/// </summary>
public readonly record struct CpuidEntry(uint Function, uint Index, uint Flags, uint Eax, uint Ebx, uint Ecx, uint Edx)
{
    /// <summary>KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the entry applies only to this <see cref="Index"/>.</summary>
    public const uint FlagSignificantIndex = 1;
    public const uint FlagStatefulFunc = 2;
    public const uint FlagStateReadNext = 4;

    public uint Get(CpuidRegister r) => r switch
    {
        CpuidRegister.Eax => Eax,
        CpuidRegister.Ebx => Ebx,
        CpuidRegister.Ecx => Ecx,
        _ => Edx,
    };

    public CpuidEntry With(CpuidRegister r, uint value) => r switch
    {
        CpuidRegister.Eax => this with { Eax = value },
        CpuidRegister.Ebx => this with { Ebx = value },
        CpuidRegister.Ecx => this with { Ecx = value },
        _ => this with { Edx = value },
    };
}

public enum CpuidRegister
{
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// <summary>
/// Shapes KVM's supported CPUID list (KVM_GET_SUPPORTED_CPUID) into what one vCPU should see:
/// its APIC id and the topology (one thread per core, <c>cpuCount</c> cores in one package), the
/// hypervisor bit, no thermal/power leaf, and minus the features of a <see cref="CpuTemplate"/>.
/// Leaves are otherwise passed through unchanged, including KVM's 0x40000000 signature leaves.
/// </summary>
public static class CpuidShaper
{
    private const uint Leaf1EcxHypervisor = 1u << 31;
    private const uint Leaf1EdxHtt = 1u << 28;

    // Topology level types for leaves 0xB/0x1F (SDM Vol. 2A, CPUID).
    private const uint LevelSmt = 1;
    private const uint LevelCore = 2;

    /// <summary>The CPUID table for vCPU <paramref name="vcpuIndex"/> of <paramref name="cpuCount"/>.</summary>
    /// <exception cref="ArgumentOutOfRangeException">cpuCount is not 1..254, or vcpuIndex is not below it.</exception>
    public static CpuidEntry[] ForVcpu(ReadOnlySpan<CpuidEntry> supported, int vcpuIndex, int cpuCount, CpuTemplate template)
    {
        ArgumentNullException.ThrowIfNull(template);
        if (cpuCount < 1 || cpuCount > MpTable.MaxCpus)
            throw new ArgumentOutOfRangeException(nameof(cpuCount), $"CPU count {cpuCount} is not in 1..{MpTable.MaxCpus}.");
        if (vcpuIndex < 0 || vcpuIndex >= cpuCount)
            throw new ArgumentOutOfRangeException(nameof(vcpuIndex), $"vCPU index {vcpuIndex} is not below the CPU count {cpuCount}.");

        uint apicId = (uint)vcpuIndex;
        uint count = (uint)cpuCount;
        // Bits of the APIC id that number the cores of the package: ceil(log2(cpuCount)).
        int coreShift = count <= 1 ? 0 : 32 - System.Numerics.BitOperations.LeadingZeroCount(count - 1);
        bool amd = IsAmd(supported);

        var result = new List<CpuidEntry>(supported.Length + 4);
        bool has0B = false, has1F = false;
        foreach (var e0 in supported)
        {
            var e = e0;
            switch (e.Function)
            {
                case 0x1:
                    // EBX[31:24] initial APIC id; EBX[23:16] addressable logical-processor ids in the
                    // package (2^coreShift, consistent with leaf 0xB); HTT says that field is valid.
                    e = e with
                    {
                        Ebx = (e.Ebx & 0x0000ffff) | (apicId << 24) | (Math.Min(1u << coreShift, 255u) << 16),
                        Ecx = e.Ecx | Leaf1EcxHypervisor,
                        Edx = count > 1 ? e.Edx | Leaf1EdxHtt : e.Edx & ~Leaf1EdxHtt,
                    };
                    break;
                case 0x4:
                    if ((e.Eax & 0x1f) != 0) // cache type 0 = no more caches
                    {
                        uint level = (e.Eax >> 5) & 0x7;
                        uint sharing = level >= 3 ? count - 1 : 0; // L1/L2 per core (one thread), L3 per package
                        uint cores = Math.Min(count - 1, 63);
                        e = e with { Eax = (e.Eax & 0x3fff) | (Math.Min(sharing, 0xfff) << 14) | (cores << 26) };
                    }
                    else
                    {
                        e = e with { Eax = e.Eax & 0x3fff };
                    }
                    break;
                case 0x6:
                    // Thermal and power management: nothing a guest can use.
                    e = e with { Eax = 0, Ebx = 0, Ecx = 0, Edx = 0 };
                    break;
                case 0xB:
                    has0B = true;
                    continue; // rebuilt below
                case 0x1F:
                    has1F = true;
                    continue;
                case 0x80000008 when amd:
                    // ECX[7:0] NC = cores - 1; ECX[15:12] ApicIdCoreIdSize (AMD APM Vol. 3, E.4.7).
                    e = e with { Ecx = (e.Ecx & ~0xf0ffu) | (count - 1) | ((uint)coreShift << 12) };
                    break;
                case 0x8000001E when amd:
                    // Extended APIC id; compute unit id = vCPU (one thread per unit, EBX[15:8] = 0);
                    // node 0, one node per processor (AMD APM Vol. 3, E.4.14 / PPR "Core Identifiers").
                    e = e with { Eax = apicId, Ebx = (e.Ebx & ~0xffffu) | (apicId & 0xff), Ecx = e.Ecx & ~0x7ffu };
                    break;
            }
            result.Add(e);
        }
        if (has0B)
            AddTopology(result, 0xB, apicId, count, coreShift);
        if (has1F)
            AddTopology(result, 0x1F, apicId, count, coreShift);

        template.Apply(result);
        return [.. result];
    }

    /// <summary>Extended topology (leaf 0xB / 0x1F): SMT level with one thread, core level with cpuCount cores, then an invalid level.</summary>
    private static void AddTopology(List<CpuidEntry> list, uint leaf, uint apicId, uint count, int coreShift)
    {
        const uint flags = CpuidEntry.FlagSignificantIndex;
        list.Add(new CpuidEntry(leaf, 0, flags, Eax: 0, Ebx: 1, Ecx: (LevelSmt << 8) | 0, Edx: apicId));
        list.Add(new CpuidEntry(leaf, 1, flags, Eax: (uint)coreShift, Ebx: count, Ecx: (LevelCore << 8) | 1, Edx: apicId));
        list.Add(new CpuidEntry(leaf, 2, flags, Eax: 0, Ebx: 0, Ecx: 2, Edx: apicId));
    }

    private static bool IsAmd(ReadOnlySpan<CpuidEntry> entries)
    {
        foreach (var e in entries)
        {
            if (e.Function == 0)
            {
                // "AuthenticAMD": EBX "Auth", EDX "enti", ECX "cAMD"; Hygon's "HygonGenuine" follows AMD's layout.
                return (e.Ebx == 0x68747541 && e.Edx == 0x69746e65 && e.Ecx == 0x444d4163)
                    || (e.Ebx == 0x6f677948 && e.Edx == 0x6e65476e && e.Ecx == 0x656e6975);
            }
        }
        return false;
    }
}
