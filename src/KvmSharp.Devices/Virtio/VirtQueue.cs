using System.Numerics;
using System.Runtime.InteropServices;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>Outcome of <see cref="VirtQueue.TryPop"/>.</summary>
public enum PopResult
{
    /// <summary>The driver has made no new buffers available.</summary>
    Empty,

    /// <summary>A valid chain was popped into the <see cref="DescriptorChain"/>.</summary>
    Chain,

    /// <summary>
    /// A chain was consumed from the available ring but is malformed (loop, bad index, indirect
    /// misuse, readable after writable, buffer outside RAM, too long). <see cref="DescriptorChain.Head"/>
    /// is valid: return it through the used ring with length 0 (or a device-specific error status)
    /// and log it, rate-limited.
    /// </summary>
    BadChain,

    /// <summary>
    /// The rings themselves are impossible for an honest driver (the available index ran more than
    /// a queue size ahead, a head index out of range, ring memory gone). Stop using the queue and
    /// set DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2).
    /// </summary>
    BrokenRing,
}

/// <summary>
/// The device side of a split virtqueue (virtio 1.2 §2.7): the descriptor table, the available
/// ring (driver area) and the used ring (device area) in guest memory, plus the device's private
/// indices. Configured by a transport (queue size, ring addresses, ready), then driven by one
/// device thread: <see cref="TryPop"/>, <see cref="TryAddUsed"/> (or <see cref="TryWriteUsed"/>
/// several times, then <see cref="TryPublishUsed"/>), <see cref="NeedsNotification"/>.
/// </summary>
/// <remarks>
/// <para>Not thread-safe: one thread (the I/O thread, or a vCPU for a synchronous device) owns a
/// queue at a time.</para>
/// <para>Ordering follows virtio 1.2 §2.7.13 and firecracker queue.rs: the available index is read
/// with acquire semantics before the ring entries it publishes; used elements are written before
/// the used index is published with release semantics; a full fence separates publishing the used
/// index from reading the driver's event index or flags.</para>
/// <para>Guest-controlled fields (indices, descriptors) are read once into locals and validated
/// there (style.md §5).</para>
/// </remarks>
public sealed class VirtQueue
{
    /// <summary>Largest queue size a split virtqueue can have (virtio 1.2 §2.7).</summary>
    public const ushort MaxQueueSize = 32768;

    // Descriptor flags (virtio 1.2 §2.7.5).
    private const ushort VIRTQ_DESC_F_NEXT = 1;
    private const ushort VIRTQ_DESC_F_WRITE = 2;
    private const ushort VIRTQ_DESC_F_INDIRECT = 4;

    // Ring flags (virtio 1.2 §2.7.6, §2.7.8).
    private const ushort VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
    private const ushort VIRTQ_USED_F_NO_NOTIFY = 1;

    // Layout (virtio 1.2 §2.7, table "Virtqueue Part Alignment and Size").
    private const ulong DescriptorSize = 16;
    private const ulong DescriptorAlignment = 16;
    private const ulong AvailableAlignment = 2;
    private const ulong UsedAlignment = 4;
    private const ulong RingHeaderSize = 4;   // flags, idx
    private const ulong AvailableElementSize = 2;
    private const ulong UsedElementSize = 8;

    // An indirect table holds at most this many descriptors: "next" is 16 bits.
    private const uint MaxIndirectDescriptors = 65536;

    [StructLayout(LayoutKind.Sequential)]
    private struct virtq_desc
    {
        public ulong addr;
        public uint len;
        public ushort flags;
        public ushort next;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct virtq_used_elem
    {
        public uint id;
        public uint len;
    }

    private ushort _signalledUsed;
    private bool _signalledUsedValid;
    private int _unpublishedUsed;

    /// <summary>Creates a queue that offers at most <paramref name="maxSize"/> entries.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="maxSize"/> is not a power of
    /// two between 1 and <see cref="MaxQueueSize"/>.</exception>
    public VirtQueue(ushort maxSize)
    {
        ValidateMaxSize(maxSize);
        MaxSize = maxSize;
        Size = maxSize;
    }

    /// <summary>Checks a device's queue size before it builds anything sized by it (§2.7: a
    /// power of two, at most 32768).</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="maxSize"/> is not a power of
    /// two between 1 and <see cref="MaxQueueSize"/>.</exception>
    public static void ValidateMaxSize(ushort maxSize, [System.Runtime.CompilerServices.CallerArgumentExpression(nameof(maxSize))] string? name = null)
    {
        if (maxSize == 0 || maxSize > MaxQueueSize || !BitOperations.IsPow2((uint)maxSize))
            throw new ArgumentOutOfRangeException(name, maxSize, "A queue size must be a power of two up to 32768.");
    }

    /// <summary>The largest size the device offers (queue_size as read by the driver at reset).</summary>
    public ushort MaxSize { get; }

    /// <summary>Queue size set by the driver; checked by <see cref="IsValid"/>.</summary>
    public ushort Size { get; set; }

    /// <summary>Guest address of the descriptor table (queue_desc).</summary>
    public GuestAddress DescriptorTable { get; set; }

    /// <summary>Guest address of the available ring, the driver area (queue_driver).</summary>
    public GuestAddress AvailableRing { get; set; }

    /// <summary>Guest address of the used ring, the device area (queue_device).</summary>
    public GuestAddress UsedRing { get; set; }

    /// <summary>Set by the driver (queue_enable) once the addresses are written.</summary>
    public bool Ready { get; set; }

    /// <summary>Whether VIRTIO_F_EVENT_IDX was negotiated (virtio 1.2 §2.7.7, §2.7.10).</summary>
    public bool EventIndex { get; set; }

    /// <summary>Index of the next available-ring entry the device will consume (free-running, mod 2^16).</summary>
    public ushort NextAvailable { get; private set; }

    /// <summary>Index of the next used-ring entry the device will fill (free-running, mod 2^16).</summary>
    public ushort NextUsed { get; private set; }

    /// <summary>Back to the state after a device reset: size = max, not ready, indices 0.</summary>
    public void Reset()
    {
        Size = MaxSize;
        DescriptorTable = default;
        AvailableRing = default;
        UsedRing = default;
        Ready = false;
        EventIndex = false;
        NextAvailable = 0;
        NextUsed = 0;
        _signalledUsed = 0;
        _signalledUsedValid = false;
        _unpublishedUsed = 0;
    }

    private ulong AvailableRingSize => RingHeaderSize + AvailableElementSize * Size + 2; // + used_event
    private ulong UsedRingSize => RingHeaderSize + UsedElementSize * Size + 2;           // + avail_event

    /// <summary>
    /// True when the queue may be used: ready, size a power of two within <see cref="MaxSize"/>,
    /// each part aligned (16/2/4) and wholly inside guest RAM (virtio 1.2 §2.7; virtio-queue
    /// <c>is_valid</c>, firecracker <c>Queue::initialize</c>).
    /// </summary>
    public bool IsValid(GuestMemory memory)
    {
        ArgumentNullException.ThrowIfNull(memory);
        if (!Ready || Size == 0 || Size > MaxSize || !BitOperations.IsPow2((uint)Size))
            return false;
        if (DescriptorTable.Value % DescriptorAlignment != 0
            || AvailableRing.Value % AvailableAlignment != 0
            || UsedRing.Value % UsedAlignment != 0)
            return false;
        return memory.IsValidRange(DescriptorTable, DescriptorSize * Size)
            && memory.IsValidRange(AvailableRing, AvailableRingSize)
            && memory.IsValidRange(UsedRing, UsedRingSize);
    }

    /// <summary>Number of chains the driver has made available and the device not yet popped.</summary>
    /// <returns>The count, or -1 when the available index is impossible (more than a queue size ahead).</returns>
    public int PendingCount(GuestMemory memory)
    {
        ArgumentNullException.ThrowIfNull(memory);
        if (!memory.TryReadVolatileUInt16(AvailableIndexAddress, out ushort availableIndex))
            return -1;
        int pending = (ushort)(availableIndex - NextAvailable);
        return pending > Size ? -1 : pending;
    }

    /// <summary>
    /// Pops the next available chain into <paramref name="chain"/> (virtio 1.2 §2.7.13.2 from the
    /// device side), following an indirect table if the head points to one (§2.7.5.3).
    /// </summary>
    /// <remarks>Call only on a queue for which <see cref="IsValid"/> returned true.</remarks>
    public PopResult TryPop(GuestMemory memory, DescriptorChain chain)
    {
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(chain);

        // Acquire: the ring entry below is read after the index that published it.
        if (!memory.TryReadVolatileUInt16(AvailableIndexAddress, out ushort availableIndex))
            return PopResult.BrokenRing;
        ushort pending = (ushort)(availableIndex - NextAvailable);
        if (pending == 0)
            return PopResult.Empty;
        if (pending > Size)
            return PopResult.BrokenRing; // firecracker queue.rs InvalidAvailIdx

        ulong slot = (ulong)(NextAvailable % Size);
        if (!memory.TryRead(new GuestAddress(AvailableRing.Value + RingHeaderSize + AvailableElementSize * slot), out ushort head))
            return PopResult.BrokenRing;
        if (head >= Size)
            return PopResult.BrokenRing; // no descriptor to return through the used ring
        NextAvailable++;

        chain.Reset(head);
        return ParseChain(memory, chain, head) ? PopResult.Chain : PopResult.BadChain;
    }

    /// <summary>Walks the chain starting at <paramref name="head"/>; false when it is malformed.</summary>
    private bool ParseChain(GuestMemory memory, DescriptorChain chain, ushort head)
    {
        GuestAddress table = DescriptorTable;
        uint tableSize = Size;
        bool inIndirect = false;
        uint index = head;
        // A chain is never longer than the queue (virtio 1.2 §2.7.5.3.1; virtio-queue chain.rs
        // ttl): this bounds the walk and catches loops. An indirect table starts a budget of its
        // own: the descriptor that points to it is no buffer, and Linux fills a table with up to
        // queue-size entries (virtio-blk: seg_max data segments plus header and status).
        int budget = Math.Min((int)Size, chain.Capacity);

        while (true)
        {
            if (budget-- == 0)
                return false;
            if (!memory.TryRead(new GuestAddress(table.Value + DescriptorSize * index), out virtq_desc desc))
                return false;

            if ((desc.flags & VIRTQ_DESC_F_INDIRECT) != 0)
            {
                // §2.7.5.3.1: no indirect inside an indirect table, INDIRECT and NEXT not both,
                // and the table is a whole number of descriptors.
                if (inIndirect || (desc.flags & VIRTQ_DESC_F_NEXT) != 0)
                    return false;
                if (desc.len == 0 || desc.len % DescriptorSize != 0 || desc.len / DescriptorSize > MaxIndirectDescriptors)
                    return false;
                if (!memory.IsValidRange(new GuestAddress(desc.addr), desc.len))
                    return false;
                table = new GuestAddress(desc.addr);
                tableSize = (uint)(desc.len / DescriptorSize);
                inIndirect = true;
                index = 0;
                budget = (int)Math.Min(tableSize, (uint)chain.Capacity);
                continue;
            }

            bool writable = (desc.flags & VIRTQ_DESC_F_WRITE) != 0;
            // §2.7.4.2: device-writable descriptors come after all device-readable ones.
            if (!writable && chain.HasWritable)
                return false;
            if (desc.len != 0)
            {
                if (!memory.IsValidRange(new GuestAddress(desc.addr), desc.len))
                    return false;
                if (!chain.TryAdd(new GuestAddress(desc.addr), desc.len, writable))
                    return false;
            }

            if ((desc.flags & VIRTQ_DESC_F_NEXT) == 0)
                return true;
            index = desc.next;
            if (index >= tableSize)
                return false;
        }
    }

    /// <summary>
    /// Returns a chain to the driver: writes the used element (id = <paramref name="head"/>,
    /// len = bytes the device wrote) and publishes it by advancing used.idx (virtio 1.2 §2.7.8).
    /// Same as <see cref="TryWriteUsed"/> then <see cref="TryPublishUsed"/>.
    /// </summary>
    /// <returns>False when the used ring is no longer in RAM (the queue is broken).</returns>
    public bool TryAddUsed(GuestMemory memory, ushort head, uint length) =>
        TryWriteUsed(memory, head, length) && TryPublishUsed(memory);

    /// <summary>Used elements written by <see cref="TryWriteUsed"/> and not yet published.</summary>
    public int UnpublishedUsed => _unpublishedUsed;

    /// <summary>
    /// Writes a used element into the next free used-ring slot without advancing used.idx, so the
    /// driver cannot see it yet (Linux vhost <c>vhost_add_used_n</c>). Call
    /// <see cref="TryPublishUsed"/> to make every element written so far visible at once: a
    /// virtio-net frame spread over several buffers (VIRTIO_NET_F_MRG_RXBUF, virtio 1.2
    /// §5.1.6.4) must appear whole, because the driver reads num_buffers from the first buffer
    /// and then expects that many used entries to be there.
    /// </summary>
    /// <returns>False when the used ring is no longer in RAM, or when <see cref="Size"/> elements
    /// are already unpublished: an honest driver cannot have more chains outstanding than it has
    /// descriptors, and one more would overwrite an unpublished slot. Treat both as a broken queue.</returns>
    public bool TryWriteUsed(GuestMemory memory, ushort head, uint length)
    {
        ArgumentNullException.ThrowIfNull(memory);
        if (_unpublishedUsed >= Size)
            return false;
        ulong slot = (ulong)((ushort)(NextUsed + _unpublishedUsed) % Size);
        var element = new virtq_used_elem { id = head, len = length };
        if (!memory.TryWrite(new GuestAddress(UsedRing.Value + RingHeaderSize + UsedElementSize * slot), element))
            return false;
        _unpublishedUsed++;
        return true;
    }

    /// <summary>
    /// Publishes every element written by <see cref="TryWriteUsed"/> with one store to used.idx
    /// (virtio 1.2 §2.7.8). A no-op when there are none.
    /// </summary>
    /// <returns>False when the used ring is no longer in RAM (the queue is broken).</returns>
    public bool TryPublishUsed(GuestMemory memory)
    {
        ArgumentNullException.ThrowIfNull(memory);
        if (_unpublishedUsed == 0)
            return true;
        ushort old = NextUsed;
        ushort next = (ushort)(old + _unpublishedUsed);
        // Release: the elements are visible before the index that publishes them.
        if (!memory.TryWriteVolatileUInt16(UsedIndexAddress, next))
            return false;
        NextUsed = next;
        _unpublishedUsed = 0;
        // Linux vhost_add_used_n: if used.idx went all the way round since the last interrupt,
        // the index we remembered now lies inside this batch and vring_need_event would compare
        // against a stale value (and could suppress a needed interrupt): treat it as unknown.
        if ((ushort)(next - _signalledUsed) < (ushort)(next - old))
            _signalledUsedValid = false;
        return true;
    }

    /// <summary>
    /// Whether the driver wants an interrupt for the used entries published since the previous
    /// call (virtio 1.2 §2.7.10): with EVENT_IDX, when used_event lies in [old, new) for the
    /// used.idx values old (at the previous call) and new (now), so a batch that jumps over
    /// used_event still interrupts; otherwise unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT.
    /// Unpublished elements (<see cref="TryWriteUsed"/>) do not count.
    /// </summary>
    public bool NeedsNotification(GuestMemory memory)
    {
        ArgumentNullException.ThrowIfNull(memory);
        // The used index store must be visible before we read the driver's suppression state,
        // or both sides can decide the other will act (virtio-queue needs_notification fence).
        Interlocked.MemoryBarrier();
        if (!EventIndex)
        {
            if (!memory.TryReadVolatileUInt16(AvailableRing, out ushort flags))
                return true;
            return (flags & VIRTQ_AVAIL_F_NO_INTERRUPT) == 0;
        }

        ushort newIndex = NextUsed;
        ushort oldIndex = _signalledUsed;
        bool valid = _signalledUsedValid;
        if (!memory.TryReadVolatileUInt16(UsedEventAddress, out ushort usedEvent))
            return true;
        _signalledUsed = newIndex;
        _signalledUsedValid = true;
        if (!valid)
            return true;
        // vring_need_event (virtio 1.2 §2.7.10.1 / Linux virtio_ring.h).
        return (ushort)(newIndex - usedEvent - 1) < (ushort)(newIndex - oldIndex);
    }

    /// <summary>
    /// Asks the driver to notify the device of new buffers (virtio 1.2 §2.7.7, §2.7.10): clears
    /// VIRTQ_USED_F_NO_NOTIFY, or with EVENT_IDX sets avail_event to <see cref="NextAvailable"/>.
    /// </summary>
    /// <returns>True when buffers became available meanwhile: process them before sleeping, since
    /// the driver may not have seen the request in time.</returns>
    public bool EnableNotification(GuestMemory memory)
    {
        ArgumentNullException.ThrowIfNull(memory);
        if (EventIndex)
            memory.TryWriteVolatileUInt16(AvailEventAddress, NextAvailable);
        else
            memory.TryWriteVolatileUInt16(UsedRing, 0);
        Interlocked.MemoryBarrier();
        return PendingCount(memory) != 0;
    }

    /// <summary>
    /// Tells the driver notifications are not needed while the device is busy draining the queue
    /// (VIRTQ_USED_F_NO_NOTIFY). With EVENT_IDX this is a no-op: avail_event simply stays behind.
    /// </summary>
    public void DisableNotification(GuestMemory memory)
    {
        ArgumentNullException.ThrowIfNull(memory);
        if (!EventIndex)
            memory.TryWriteVolatileUInt16(UsedRing, VIRTQ_USED_F_NO_NOTIFY);
    }

    private GuestAddress AvailableIndexAddress => new(AvailableRing.Value + 2);
    private GuestAddress UsedEventAddress => new(AvailableRing.Value + RingHeaderSize + AvailableElementSize * Size);
    private GuestAddress UsedIndexAddress => new(UsedRing.Value + 2);
    private GuestAddress AvailEventAddress => new(UsedRing.Value + RingHeaderSize + UsedElementSize * Size);
}
