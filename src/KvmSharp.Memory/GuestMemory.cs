using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using KvmSharp.Interop;

namespace KvmSharp.Memory;

/// <summary>How guest RAM is backed.</summary>
public sealed record GuestMemoryOptions
{
    /// <summary>Mark RAM <c>MADV_MERGEABLE</c> so KSM can share identical pages between VMs.</summary>
    public bool Mergeable { get; init; }

    /// <summary>Back RAM with hugetlbfs pages (<c>MAP_HUGETLB</c>); fails when none are reserved.</summary>
    public bool HugePages { get; init; }

    /// <summary>Ask for transparent huge pages (<c>MADV_HUGEPAGE</c>).</summary>
    public bool TransparentHugePages { get; init; }

    /// <summary>
    /// Populate all of RAM up front (<c>MADV_POPULATE_WRITE</c>, Linux 5.14; QEMU's -mem-prealloc,
    /// Cloud Hypervisor's prefault=on): no host page faults while the guest runs, and the host
    /// commits the memory now rather than at an awkward moment later.
    /// </summary>
    public bool Prefault { get; init; }
}

/// <summary>
/// Guest RAM: a sorted set of non-overlapping regions, each one host mapping. Every accessor checks
/// that the whole range lies in guest RAM with overflow-checked arithmetic (style.md §5); a range
/// that crosses two regions is split. Nothing here ever touches memory outside the mappings.
/// </summary>
public sealed unsafe class GuestMemory : IDisposable
{
    private readonly GuestRegion[] _regions;
    private readonly bool _heap;
    private bool _disposed;

    private GuestMemory(GuestRegion[] regions, bool heap)
    {
        _regions = regions;
        _heap = heap;
    }

    public IReadOnlyList<GuestRegion> Regions => _regions;

    /// <summary>Total bytes of RAM.</summary>
    public ulong TotalSize { get; private init; }

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
            Volatile.Write(ref p[offset], 0);
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

    /// <summary>The region holding <paramref name="gpa"/>, or null.</summary>
    public GuestRegion? FindRegion(ulong gpa)
    {
        // Regions are few (one or two); a linear scan beats a binary search here.
        foreach (var r in _regions)
        {
            if (r.Contains(gpa))
                return r;
        }
        return null;
    }

    /// <summary>True when every byte of [address, address + length) is guest RAM.</summary>
    public bool IsValidRange(GuestAddress address, ulong length)
    {
        ulong gpa = address.Value;
        while (length > 0)
        {
            var r = FindRegion(gpa);
            if (r is null)
                return false;
            ulong avail = r.End - gpa;
            if (avail >= length)
                return true;
            length -= avail;
            gpa = r.End;
        }
        return true;
    }

    /// <summary>
    /// A span over [address, address + length) when it lies inside one region. For bulk payload
    /// copies only: never keep it across two reads of guest-controlled data (style.md §5).
    /// </summary>
    public bool TryGetSpan(GuestAddress address, int length, out Span<byte> span)
    {
        span = default;
        if (length < 0)
            return false;
        var r = FindRegion(address.Value);
        if (r is null)
            return false;
        ulong offset = address.Value - r.Start.Value;
        if ((ulong)length > r.Size - offset)
            return false;
        span = new Span<byte>(r.Host + offset, length);
        return true;
    }

    /// <summary>Copies guest memory into <paramref name="destination"/>; false (nothing guaranteed copied) when out of RAM.</summary>
    public bool TryRead(GuestAddress address, Span<byte> destination)
    {
        ulong gpa = address.Value;
        int done = 0;
        while (done < destination.Length)
        {
            var r = FindRegion(gpa);
            if (r is null)
                return false;
            ulong offset = gpa - r.Start.Value;
            int chunk = (int)Math.Min((ulong)(destination.Length - done), r.Size - offset);
            new ReadOnlySpan<byte>(r.Host + offset, chunk).CopyTo(destination[done..]);
            done += chunk;
            gpa += (ulong)chunk;
        }
        return true;
    }

    /// <summary>Copies <paramref name="source"/> into guest memory; false when any byte is out of RAM (then nothing is written).</summary>
    public bool TryWrite(GuestAddress address, ReadOnlySpan<byte> source)
    {
        if (!IsValidRange(address, (ulong)source.Length))
            return false;
        ulong gpa = address.Value;
        int done = 0;
        while (done < source.Length)
        {
            var r = FindRegion(gpa)!;
            ulong offset = gpa - r.Start.Value;
            int chunk = (int)Math.Min((ulong)(source.Length - done), r.Size - offset);
            source.Slice(done, chunk).CopyTo(new Span<byte>(r.Host + offset, chunk));
            done += chunk;
            gpa += (ulong)chunk;
        }
        return true;
    }

    /// <summary>Fills [address, address + length) with zeros; false when out of RAM (then nothing is written).</summary>
    public bool TryZero(GuestAddress address, ulong length)
    {
        if (!IsValidRange(address, length))
            return false;
        ulong gpa = address.Value;
        while (length > 0)
        {
            var r = FindRegion(gpa)!;
            ulong offset = gpa - r.Start.Value;
            ulong chunk = Math.Min(length, r.Size - offset);
            NativeMemory.Clear(r.Host + offset, (nuint)chunk);
            length -= chunk;
            gpa += chunk;
        }
        return true;
    }

    /// <exception cref="GuestMemoryException">The range is outside guest RAM.</exception>
    public void Write(GuestAddress address, ReadOnlySpan<byte> source)
    {
        if (!TryWrite(address, source))
            throw new GuestMemoryException(address, (ulong)source.Length);
    }

    /// <exception cref="GuestMemoryException">The range is outside guest RAM.</exception>
    public void Read(GuestAddress address, Span<byte> destination)
    {
        if (!TryRead(address, destination))
            throw new GuestMemoryException(address, (ulong)destination.Length);
    }

    /// <summary>Reads an unmanaged value (unaligned, copied once into the result).</summary>
    public bool TryRead<T>(GuestAddress address, out T value) where T : unmanaged
    {
        value = default;
        return TryRead(address, MemoryMarshal.AsBytes(new Span<T>(ref value)));
    }

    public bool TryWrite<T>(GuestAddress address, in T value) where T : unmanaged =>
        TryWrite(address, MemoryMarshal.AsBytes(new ReadOnlySpan<T>(in value)));

    /// <exception cref="GuestMemoryException">The range is outside guest RAM.</exception>
    public T Read<T>(GuestAddress address) where T : unmanaged =>
        TryRead(address, out T v) ? v : throw new GuestMemoryException(address, (ulong)sizeof(T));

    /// <exception cref="GuestMemoryException">The range is outside guest RAM.</exception>
    public void Write<T>(GuestAddress address, in T value) where T : unmanaged
    {
        if (!TryWrite(address, value))
            throw new GuestMemoryException(address, (ulong)sizeof(T));
    }

    /// <summary>
    /// Host pointer to a naturally aligned <typeparamref name="T"/> at <paramref name="address"/>,
    /// for volatile ring-index access (virtio used/avail idx). Null when misaligned or outside RAM.
    /// </summary>
    public T* GetAlignedPointer<T>(GuestAddress address) where T : unmanaged
    {
        if (address.Value % (ulong)sizeof(T) != 0)
            return null;
        var r = FindRegion(address.Value);
        if (r is null || (ulong)sizeof(T) > r.End - address.Value)
            return null;
        return (T*)(r.Host + (address.Value - r.Start.Value));
    }

    public bool TryReadVolatileUInt16(GuestAddress address, out ushort value)
    {
        ushort* p = GetAlignedPointer<ushort>(address);
        value = p == null ? (ushort)0 : Volatile.Read(ref *p);
        return p != null;
    }

    public bool TryWriteVolatileUInt16(GuestAddress address, ushort value)
    {
        ushort* p = GetAlignedPointer<ushort>(address);
        if (p == null)
            return false;
        Volatile.Write(ref *p, value);
        return true;
    }

    /// <summary>
    /// Gives the pages of [address, address + length) back to the host (balloon inflation):
    /// <c>MADV_DONTNEED</c>, so the guest reads zeros afterwards. Page-aligned ranges only.
    /// </summary>
    public bool TryDiscard(GuestAddress address, ulong length)
    {
        if (address.Value % 4096 != 0 || length % 4096 != 0 || !IsValidRange(address, length))
            return false;
        ulong gpa = address.Value;
        while (length > 0)
        {
            var r = FindRegion(gpa)!;
            ulong offset = gpa - r.Start.Value;
            ulong chunk = Math.Min(length, r.Size - offset);
            if (_heap)
                NativeMemory.Clear(r.Host + offset, (nuint)chunk);
            else if (Libc.madvise(r.Host + offset, (nuint)chunk, Libc.MADV_DONTNEED) != 0)
                return false;
            length -= chunk;
            gpa += chunk;
        }
        return true;
    }

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        foreach (var r in _regions)
        {
            if (_heap)
                NativeMemory.Free(r.Host);
            else
                Libc.munmap(r.Host, (nuint)r.Size);
        }
    }
}
