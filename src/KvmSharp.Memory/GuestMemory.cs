using System.Runtime.InteropServices;

namespace KvmSharp.Memory;

/// <summary>
/// Guest RAM: a sorted set of non-overlapping regions, each one host mapping. Every accessor checks
/// that the whole range lies in guest RAM with overflow-checked arithmetic (style.md §5); a range
/// that crosses two regions is split, by one walk (<see cref="ChunkWalk"/>, vm-memory's
/// <c>try_access</c>) that every accessor uses. Nothing here ever touches memory outside the mappings.
/// This file is access; creating, advising and discarding the mappings is in GuestMemory.Mapping.cs.
/// </summary>
public sealed unsafe partial class GuestMemory : IDisposable
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

    /// <summary>
    /// [gpa, gpa + length) as host-contiguous chunks, one per region it crosses, in order. Each
    /// <see cref="MoveNext"/> gives the next chunk (<see cref="Host"/>, <see cref="Length"/>, and
    /// <see cref="Done"/>, the bytes before it); it stops at the end or at the first byte outside RAM,
    /// and <see cref="Complete"/> tells which. A chunk never leaves its region: <c>Length</c> is at
    /// most <c>region.End - gpa</c>, computed without overflow because <c>gpa</c> lies in the region
    /// and <c>End</c> was checked when the layout was built. No allocation.
    /// </summary>
    private ref struct ChunkWalk(GuestMemory memory, ulong gpa, ulong length)
    {
        private ulong _gpa = gpa;
        private ulong _left = length;

        public byte* Host { get; private set; }
        public ulong Length { get; private set; }
        public ulong Done { get; private set; }

        public readonly bool Complete => _left == 0;

        public bool MoveNext()
        {
            Done += Length;
            Length = 0;
            if (_left == 0)
                return false;
            var r = memory.FindRegion(_gpa);
            if (r is null)
                return false;
            ulong offset = _gpa - r.Start.Value;
            Length = Math.Min(_left, r.Size - offset);
            // SAFETY (pointer arithmetic only): offset < r.Size, so Host stays inside the region's mapping.
            Host = r.Host + offset;
            _left -= Length;
            _gpa += Length;
            return true;
        }
    }

    /// <summary>True when every byte of [address, address + length) is guest RAM.</summary>
    public bool IsValidRange(GuestAddress address, ulong length)
    {
        var walk = new ChunkWalk(this, address.Value, length);
        while (walk.MoveNext())
        {
        }
        return walk.Complete;
    }

    /// <summary>
    /// A span over [address, address + length) when it lies inside one region. For bulk payload
    /// copies only: never keep it across two reads of guest-controlled data (style.md §5).
    /// </summary>
    public bool TryGetSpan(GuestAddress address, int length, out Span<byte> span)
    {
        span = default;
        if (length <= 0)
            return length == 0 && FindRegion(address.Value) is not null;
        var walk = new ChunkWalk(this, address.Value, (ulong)length);
        if (!walk.MoveNext() || !walk.Complete)
            return false;
        // SAFETY: one chunk covers the whole range, inside one live mapping (ChunkWalk; mappings live
        // until Dispose, after every user has stopped).
        span = new Span<byte>(walk.Host, length);
        return true;
    }

    /// <summary>Copies guest memory into <paramref name="destination"/>; false (nothing guaranteed copied) when out of RAM.</summary>
    public bool TryRead(GuestAddress address, Span<byte> destination)
    {
        var walk = new ChunkWalk(this, address.Value, (ulong)destination.Length);
        while (walk.MoveNext())
        {
            // SAFETY: [Host, Host + Length) is inside one live mapping (ChunkWalk), and Done + Length
            // <= destination.Length because the walk covers exactly destination.Length bytes.
            new ReadOnlySpan<byte>(walk.Host, (int)walk.Length).CopyTo(destination[(int)walk.Done..]);
        }
        return walk.Complete;
    }

    /// <summary>Copies <paramref name="source"/> into guest memory; false when any byte is out of RAM (then nothing is written).</summary>
    public bool TryWrite(GuestAddress address, ReadOnlySpan<byte> source)
    {
        if (!IsValidRange(address, (ulong)source.Length))
            return false;
        var walk = new ChunkWalk(this, address.Value, (ulong)source.Length);
        while (walk.MoveNext())
        {
            // SAFETY: as in TryRead, with source in place of destination.
            source.Slice((int)walk.Done, (int)walk.Length).CopyTo(new Span<byte>(walk.Host, (int)walk.Length));
        }
        return true;
    }

    /// <summary>Fills [address, address + length) with zeros; false when out of RAM (then nothing is written).</summary>
    public bool TryZero(GuestAddress address, ulong length)
    {
        if (!IsValidRange(address, length))
            return false;
        var walk = new ChunkWalk(this, address.Value, length);
        while (walk.MoveNext())
        {
            // SAFETY: [Host, Host + Length) is inside one live mapping (ChunkWalk).
            NativeMemory.Clear(walk.Host, (nuint)walk.Length);
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
        var walk = new ChunkWalk(this, address.Value, (ulong)sizeof(T));
        // The whole value in one chunk, i.e. in one region.
        return walk.MoveNext() && walk.Complete ? (T*)walk.Host : null;
    }

    public bool TryReadVolatileUInt16(GuestAddress address, out ushort value)
    {
        ushort* p = GetAlignedPointer<ushort>(address);
        // SAFETY: p is null or an aligned ushort inside one live mapping (GetAlignedPointer).
        value = p == null ? (ushort)0 : Volatile.Read(ref *p);
        return p != null;
    }

    public bool TryWriteVolatileUInt16(GuestAddress address, ushort value)
    {
        ushort* p = GetAlignedPointer<ushort>(address);
        if (p == null)
            return false;
        // SAFETY: p is an aligned ushort inside one live mapping (GetAlignedPointer).
        Volatile.Write(ref *p, value);
        return true;
    }
}
