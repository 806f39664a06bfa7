using KvmSharp.Kvm.Native;
using KvmSharp.Memory;

namespace KvmSharp.Vmm.Cpu;

/// <summary>
/// Translates a guest-virtual address the way the vCPU's MMU would (Intel SDM vol. 3 §4: 32-bit,
/// PAE and 4-level paging), reading the guest's page tables through checked accessors. Used for
/// diagnostics and the PVM compatibility layer only, never on a hot path of an honest guest.
/// </summary>
internal static class GuestPageWalker
{
    private const ulong CR0_PG = 1UL << 31;
    private const ulong CR4_PSE = 1UL << 4;
    private const ulong CR4_PAE = 1UL << 5;
    private const ulong CR4_LA57 = 1UL << 12;
    private const ulong EFER_LMA = 1UL << 10;
    private const ulong Present = 1, PageSize = 1UL << 7;
    private const ulong AddrMask = 0x000F_FFFF_FFFF_F000UL;

    public static bool TryTranslate(GuestMemory memory, in kvm_sregs sregs, ulong gva, out ulong gpa)
    {
        gpa = 0;
        if ((sregs.cr0 & CR0_PG) == 0)
        {
            gpa = gva;
            return true;
        }
        if ((sregs.efer & EFER_LMA) != 0)
        {
            int levels = (sregs.cr4 & CR4_LA57) != 0 ? 5 : 4;
            ulong table = sregs.cr3 & AddrMask;
            for (int level = levels; level >= 1; level--)
            {
                int shift = 12 + 9 * (level - 1);
                ulong index = (gva >> shift) & 0x1FF;
                if (!memory.TryRead(new GuestAddress(table + index * 8), out ulong entry) || (entry & Present) == 0)
                    return false;
                if (level is 2 or 3 && (entry & PageSize) != 0)
                {
                    ulong pageMask = (1UL << shift) - 1;
                    gpa = (entry & AddrMask & ~pageMask) | (gva & pageMask);
                    return true;
                }
                table = entry & AddrMask;
            }
            gpa = table | (gva & 0xFFF);
            return true;
        }
        if ((sregs.cr4 & CR4_PAE) != 0)
        {
            ulong pdptAddr = (sregs.cr3 & 0xFFFF_FFE0) + ((gva >> 30) & 3) * 8;
            if (!memory.TryRead(new GuestAddress(pdptAddr), out ulong pdpte) || (pdpte & Present) == 0)
                return false;
            if (!memory.TryRead(new GuestAddress((pdpte & AddrMask) + ((gva >> 21) & 0x1FF) * 8), out ulong pde) || (pde & Present) == 0)
                return false;
            if ((pde & PageSize) != 0)
            {
                gpa = (pde & AddrMask & ~0x1F_FFFFUL) | (gva & 0x1F_FFFF);
                return true;
            }
            if (!memory.TryRead(new GuestAddress((pde & AddrMask) + ((gva >> 12) & 0x1FF) * 8), out ulong pte) || (pte & Present) == 0)
                return false;
            gpa = (pte & AddrMask) | (gva & 0xFFF);
            return true;
        }
        uint va = (uint)gva;
        if (!memory.TryRead(new GuestAddress((sregs.cr3 & 0xFFFF_F000) + (va >> 22) * 4), out uint pde32) || (pde32 & Present) == 0)
            return false;
        if ((pde32 & PageSize) != 0 && (sregs.cr4 & CR4_PSE) != 0)
        {
            gpa = (pde32 & 0xFFC0_0000UL) | (va & 0x3F_FFFFUL);
            return true;
        }
        if (!memory.TryRead(new GuestAddress((pde32 & 0xFFFF_F000UL) + ((va >> 12) & 0x3FF) * 4), out uint pte32) || (pte32 & Present) == 0)
            return false;
        gpa = (pte32 & 0xFFFF_F000UL) | (va & 0xFFF);
        return true;
    }

    /// <summary>Reads guest-virtual memory page by page; false when any page is unmapped or outside RAM.</summary>
    public static bool TryReadVirtual(GuestMemory memory, in kvm_sregs sregs, ulong gva, Span<byte> destination)
    {
        int done = 0;
        while (done < destination.Length)
        {
            ulong va = gva + (ulong)done;
            if (!TryTranslate(memory, sregs, va, out ulong pa))
                return false;
            int chunk = (int)Math.Min((ulong)(destination.Length - done), 0x1000 - (va & 0xFFF));
            if (!memory.TryRead(new GuestAddress(pa), destination.Slice(done, chunk)))
                return false;
            done += chunk;
        }
        return true;
    }

    /// <summary>The linear address of CS:RIP (segment base applies outside 64-bit mode).</summary>
    public static ulong CodeAddress(in kvm_sregs sregs, ulong rip) => sregs.cs.l != 0 ? rip : sregs.cs.@base + rip;

    /// <summary>Code bitness for the decoder: 64, 32 or 16.</summary>
    public static int Bitness(in kvm_sregs sregs) =>
        sregs.cs.l != 0 && (sregs.efer & EFER_LMA) != 0 ? 64 : (sregs.cr0 & 1) != 0 && sregs.cs.db != 0 ? 32 : 16;
}
