using System.Runtime.InteropServices;
using KvmSharp.Interop;

namespace KvmSharp.Memory;

// Management: creating, advising, prefaulting, discarding and unmapping the host mappings
// (vm-memory keeps this apart from access too: mmap.rs beside guest_memory.rs). Access is in GuestMemory.cs.
public sealed unsafe partial class GuestMemory
{
    /// <summary>Maps anonymous memory for each range (mmap MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE).</summary>
    /// <exception cref="NativeException">mmap or madvise failed.</exception>
    /// <exception cref="ArgumentException">Ranges overlap, are unsorted, or overflow.</exception>
    public static GuestMemory CreateAnonymous(IReadOnlyList<(GuestAddress Start, ulong Size)> ranges, GuestMemoryOptions? options = null)
    {
        options ??= new GuestMemoryOptions();
        Validate(ranges);
        var regions = new List<GuestRegion>(ranges.Count);
        ulong total = 0;
        try
        {
            foreach (var (start, size) in ranges)
            {
                int flags = Libc.MAP_PRIVATE | Libc.MAP_ANONYMOUS | Libc.MAP_NORESERVE | (options.HugePages ? Libc.MAP_HUGETLB : 0);
                void* p = Libc.mmap(null, (nuint)size, Libc.PROT_READ | Libc.PROT_WRITE, flags, -1, 0);
                if ((nint)p == Libc.MAP_FAILED)
                    Libc.ThrowNative(options.HugePages ? "mmap(guest RAM, MAP_HUGETLB)" : "mmap(guest RAM)", Libc.LastErrno);
                // SAFETY: p is a fresh private mapping of exactly size bytes; the region owns it until Dispose.
                regions.Add(new GuestRegion(start, size, (byte*)p));
                if (options.Mergeable && Libc.madvise(p, (nuint)size, Libc.MADV_MERGEABLE) != 0)
                    Libc.ThrowNative("madvise(MADV_MERGEABLE)", Libc.LastErrno);
                if (options.TransparentHugePages && Libc.madvise(p, (nuint)size, Libc.MADV_HUGEPAGE) != 0)
                    Libc.ThrowNative("madvise(MADV_HUGEPAGE)", Libc.LastErrno);
                if (options.Prefault)
                    Populate((byte*)p, size);
                total += size;
            }
        }
        catch
        {
            // SAFETY: each region is a mapping made above and not yet handed to anyone.
            foreach (var r in regions)
                Libc.munmap(r.Host, (nuint)r.Size);
            throw;
        }
        return new GuestMemory([.. regions], heap: false) { TotalSize = total };
    }

    private static void Populate(byte* p, ulong size)
    {
        if (Libc.madvise(p, (nuint)size, Libc.MADV_POPULATE_WRITE) == 0)
            return;
        int errno = Libc.LastErrno;
        if (errno != Libc.EINVAL)
            Libc.ThrowNative("madvise(MADV_POPULATE_WRITE)", errno);
        // Older kernels: write one byte per page (the mapping is fresh, so zero keeps it zero).
        for (ulong offset = 0; offset < size; offset += 4096)
        {
            // SAFETY: offset < size, the length of the mapping p that CreateAnonymous just made.
            Volatile.Write(ref p[offset], 0);
        }
    }

    /// <summary>Zeroed native heap memory, for tests and tools that need no KVM.</summary>
    public static GuestMemory CreateForTesting(IReadOnlyList<(GuestAddress Start, ulong Size)> ranges)
    {
        Validate(ranges);
        var regions = new GuestRegion[ranges.Count];
        ulong total = 0;
        for (int i = 0; i < ranges.Count; i++)
        {
            regions[i] = new GuestRegion(ranges[i].Start, ranges[i].Size, (byte*)NativeMemory.AllocZeroed((nuint)ranges[i].Size));
            total += ranges[i].Size;
        }
        return new GuestMemory(regions, heap: true) { TotalSize = total };
    }

    private static void Validate(IReadOnlyList<(GuestAddress Start, ulong Size)> ranges)
    {
        if (ranges.Count == 0)
            throw new ArgumentException("Guest memory needs at least one region.", nameof(ranges));
        ulong prevEnd = 0;
        for (int i = 0; i < ranges.Count; i++)
        {
            var (start, size) = ranges[i];
            if (size == 0 || !start.TryAdd(size, out var end))
                throw new ArgumentException($"Region {i} at {start} of {size} bytes is empty or overflows.", nameof(ranges));
            if (i > 0 && start.Value < prevEnd)
                throw new ArgumentException($"Region {i} at {start} overlaps the previous one or is out of order.", nameof(ranges));
            prevEnd = end.Value;
        }
    }

    /// <summary>
    /// Gives the pages of [address, address + length) back to the host (balloon inflation):
    /// <c>MADV_DONTNEED</c>, so the guest reads zeros afterwards. Page-aligned ranges only.
    /// </summary>
    public bool TryDiscard(GuestAddress address, ulong length)
    {
        if (address.Value % 4096 != 0 || length % 4096 != 0 || !IsValidRange(address, length))
            return false;
        var walk = new ChunkWalk(this, address.Value, length);
        while (walk.MoveNext())
        {
            // SAFETY: the walk yields only [Host, Host + Length) inside one live mapping (ChunkWalk).
            if (_heap)
                NativeMemory.Clear(walk.Host, (nuint)walk.Length);
            else if (Libc.madvise(walk.Host, (nuint)walk.Length, Libc.MADV_DONTNEED) != 0)
                return false;
        }
        return true;
    }

    /// <summary>Unmaps (or frees) every region. Callers stop every vCPU and I/O thread first: the
    /// accessors do not guard against use after dispose.</summary>
    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        // SAFETY: once only (_disposed); each region is the mapping or heap block made for it.
        foreach (var r in _regions)
        {
            if (_heap)
                NativeMemory.Free(r.Host);
            else
                Libc.munmap(r.Host, (nuint)r.Size);
        }
    }
}
