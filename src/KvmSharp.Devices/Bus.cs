using System.Diagnostics;

namespace KvmSharp.Devices;

/// <summary>
/// An address space of non-overlapping device ranges: one instance for port I/O, one for MMIO
/// (firecracker vstate/bus.rs, vm-device). Dispatches a guest access to the device whose range
/// contains it, passing the offset from the range's base.
/// </summary>
/// <remarks>
/// <para>The address map is immutable after boot in practice and copy-on-write in implementation:
/// <see cref="Insert"/> builds a new sorted array under a writer lock and publishes it with a
/// release store; <see cref="TryRead"/>/<see cref="TryWrite"/> take an acquire load of the
/// current array and binary-search it. Lookups take no lock and allocate nothing, so any number of
/// vCPU threads may access the bus concurrently, also while a device is being inserted.</para>
/// <para>Locking: the bus holds no lock during a device call. Each device serialises itself
/// with its own lock (style.md §6, "Bus locking").</para>
/// </remarks>
public sealed class Bus
{
    private readonly record struct Entry(ulong Base, ulong Last, IBusDevice Device);

    // Sorted by Base, ranges disjoint. Replaced wholesale, never mutated after publication.
    private Entry[] _entries = [];

    // Serialises writers (Insert/Remove) only; readers never take it.
    private readonly Lock _writerLock = new();

    /// <summary>Number of ranges currently mapped.</summary>
    public int Count => Volatile.Read(ref _entries).Length;

    /// <summary>
    /// Maps <paramref name="device"/> at [<paramref name="baseAddress"/>,
    /// <paramref name="baseAddress"/> + <paramref name="length"/>). The same device may be
    /// inserted at several ranges; it then sees offsets relative to each range's base.
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="device"/> is null.</exception>
    /// <exception cref="ArgumentException"><paramref name="length"/> is zero, the range wraps
    /// past the end of the 64-bit address space, or it overlaps a range already mapped.</exception>
    public void Insert(IBusDevice device, ulong baseAddress, ulong length)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (length == 0)
            throw new ArgumentException("A bus range must not be empty.", nameof(length));
        ulong last = baseAddress + (length - 1);
        if (last < baseAddress)
            throw new ArgumentException(
                $"The range at 0x{baseAddress:x} of length 0x{length:x} runs past the end of the address space.",
                nameof(length));
        if (!TryInsertCore(device, baseAddress, last, out Entry conflict))
            throw new ArgumentException(
                $"The range 0x{baseAddress:x}-0x{last:x} overlaps the range 0x{conflict.Base:x}-0x{conflict.Last:x} " +
                $"of {conflict.Device.GetType().Name}.",
                nameof(baseAddress));
    }

    /// <summary>
    /// As <see cref="Insert"/>, but reports a zero-length, wrapping or overlapping range by
    /// returning false instead of throwing: for mappings the guest chooses (a PCI BAR it
    /// reprogrammed), where a conflict is the guest's error, not ours.
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="device"/> is null.</exception>
    public bool TryInsert(IBusDevice device, ulong baseAddress, ulong length)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (length == 0)
            return false;
        ulong last = baseAddress + (length - 1);
        return last >= baseAddress && TryInsertCore(device, baseAddress, last, out _);
    }

    private bool TryInsertCore(IBusDevice device, ulong baseAddress, ulong last, out Entry conflict)
    {
        lock (_writerLock)
        {
            Entry[] old = _entries;
            // First entry whose base is above ours: the new one goes right before it.
            int index = UpperBound(old, baseAddress);
            if (index > 0 && old[index - 1].Last >= baseAddress)
            {
                conflict = old[index - 1];
                return false;
            }
            if (index < old.Length && old[index].Base <= last)
            {
                conflict = old[index];
                return false;
            }

            var updated = new Entry[old.Length + 1];
            Array.Copy(old, 0, updated, 0, index);
            updated[index] = new Entry(baseAddress, last, device);
            Array.Copy(old, index, updated, index + 1, old.Length - index);
            Volatile.Write(ref _entries, updated);
            conflict = default;
            return true;
        }
    }

    /// <summary>Unmaps the range that starts exactly at <paramref name="baseAddress"/>.</summary>
    /// <returns>True when a range was removed; false when none starts there.</returns>
    /// <remarks>For hot-unplug. Accesses already dispatched to the device may still complete
    /// after this returns.</remarks>
    public bool Remove(ulong baseAddress)
    {
        lock (_writerLock)
        {
            Entry[] old = _entries;
            int index = UpperBound(old, baseAddress) - 1;
            if (index < 0 || old[index].Base != baseAddress)
                return false;
            var updated = new Entry[old.Length - 1];
            Array.Copy(old, 0, updated, 0, index);
            Array.Copy(old, index + 1, updated, index, old.Length - index - 1);
            Volatile.Write(ref _entries, updated);
            return true;
        }
    }

    /// <summary>
    /// Dispatches a read of <paramref name="data"/>.Length bytes at <paramref name="address"/>.
    /// </summary>
    /// <returns>False, leaving <paramref name="data"/> untouched, when no device claims the whole
    /// access: nothing is mapped there, the access straddles the end of a range, or
    /// <paramref name="data"/> is empty. The caller then fills 0xFF (open bus) and logs.</returns>
    public bool TryRead(ulong address, Span<byte> data)
    {
        Entry[] entries = Volatile.Read(ref _entries);
        int index = Find(entries, address, (ulong)data.Length);
        if (index < 0)
            return false;
        Entry e = entries[index];
        e.Device.Read(address - e.Base, data);
        return true;
    }

    /// <summary>
    /// Dispatches a write of <paramref name="data"/> at <paramref name="address"/>.
    /// </summary>
    /// <returns>False when no device claims the whole access (see <see cref="TryRead"/>); the
    /// write is then dropped.</returns>
    public bool TryWrite(ulong address, ReadOnlySpan<byte> data)
    {
        Entry[] entries = Volatile.Read(ref _entries);
        int index = Find(entries, address, (ulong)data.Length);
        if (index < 0)
            return false;
        Entry e = entries[index];
        e.Device.Write(address - e.Base, data);
        return true;
    }

    /// <summary>Index of the entry containing all of [address, address + length), or -1.</summary>
    private static int Find(Entry[] entries, ulong address, ulong length)
    {
        if (length == 0)
            return -1;
        int index = UpperBound(entries, address) - 1;
        if (index < 0)
            return -1;
        ulong last = address + (length - 1);
        // An access that wraps the address space or runs past the range's end is unclaimed.
        if (last < address || last > entries[index].Last)
            return -1;
        Debug.Assert(entries[index].Base <= address);
        return index;
    }

    /// <summary>Index of the first entry whose Base is greater than <paramref name="address"/>.</summary>
    private static int UpperBound(Entry[] entries, ulong address)
    {
        int lo = 0, hi = entries.Length;
        while (lo < hi)
        {
            int mid = (int)((uint)(lo + hi) >> 1);
            if (entries[mid].Base <= address)
                lo = mid + 1;
            else
                hi = mid;
        }
        return lo;
    }
}
