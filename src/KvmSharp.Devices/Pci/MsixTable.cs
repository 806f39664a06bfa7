using System.Buffers.Binary;

namespace KvmSharp.Devices.Pci;

/// <summary>
/// An MSI-X table and Pending Bit Array (PCI LB 3.0 §6.8.2), as one BAR region: the table at
/// offset 0 (16 bytes per vector), the PBA at <see cref="PbaOffset"/>. Also owns the capability's
/// enable and function-mask bits, which the device copies in from configuration space with
/// <see cref="SetControl"/>.
/// </summary>
/// <remarks>
/// <para>A vector fires with <see cref="Trigger"/>. While MSI-X is enabled and neither the
/// function nor the vector is masked, the message is sent; while masked, the vector's pending
/// bit is set instead, and the message is sent when it is unmasked (§6.8.2.9). Every vector
/// starts masked (§6.8.2.9, "Vector Control").</para>
/// <para>Each entry gets its own <see cref="IMsiVector"/> from the sink when there is one. The
/// table programs it on the vCPU thread that unmasks the entry (or changes an unmasked entry's
/// message) and then marks the vector live; <see cref="Trigger"/> of a live vector is a volatile
/// read and <see cref="IMsiVector.Trigger"/> (one eventfd write), with no lock. Entries without a
/// vector go through <see cref="IMsiSink.Deliver"/> under the old, locked path.</para>
/// <para>Threads: table accesses (vCPU threads) and the slow path of <see cref="Trigger"/> serialise
/// on one lock; <see cref="IMsiVector.Program"/> runs under it (lock order: table, then the sink's),
/// <see cref="IMsiSink.Deliver"/> and <see cref="IMsiVector.Trigger"/> after it is released. A
/// trigger racing with a mask may still be sent, as if it had come just before the mask.</para>
/// </remarks>
public sealed class MsixTable : IBusDevice
{
    /// <summary>Bytes per table entry.</summary>
    public const int EntrySize = 16;

    /// <summary>Offset of the PBA in the region (the table must fit below it).</summary>
    public const int PbaOffset = 0x800;

    /// <summary>Most vectors this layout holds (table below <see cref="PbaOffset"/>).</summary>
    public const int MaxVectors = PbaOffset / EntrySize;

    /// <summary>Region size to declare for the BAR.</summary>
    public const ulong RegionSize = 0x1000;

    // Entry layout (§6.8.2.6-9).
    private const int MessageAddress = 0;
    private const int MessageUpperAddress = 4;
    private const int MessageData = 8;
    private const int VectorControl = 12;
    private const uint VECTOR_CONTROL_MASK = 1;

    private readonly IMsiSink _sink;
    private readonly byte[] _table;
    private readonly ulong[] _pending;
    private readonly IMsiVector?[] _vectors;
    // The message each vector was last programmed with (valid where _programmed is set).
    private readonly (ulong Address, uint Data)[] _message;
    private readonly bool[] _programmed;
    // 1 while the vector is enabled, unmasked and programmed: Trigger's lock-free test. Written under _lock.
    private readonly int[] _live;

    // Guards _table, _pending, _message, _programmed, _functionMask and the writes of _enabled and _live.
    private readonly Lock _lock = new();
    private volatile bool _enabled;
    private bool _functionMask;

    /// <summary>Creates a table of <paramref name="vectors"/> entries, all masked.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="vectors"/> is not 1-<see cref="MaxVectors"/>.</exception>
    public MsixTable(int vectors, IMsiSink sink)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(vectors);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(vectors, MaxVectors);
        ArgumentNullException.ThrowIfNull(sink);
        _sink = sink;
        VectorCount = vectors;
        _table = new byte[vectors * EntrySize];
        _pending = new ulong[(vectors + 63) / 64];
        _vectors = new IMsiVector?[vectors];
        _message = new (ulong, uint)[vectors];
        _programmed = new bool[vectors];
        _live = new int[vectors];
        for (int v = 0; v < vectors; v++)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(_table.AsSpan(v * EntrySize + VectorControl), VECTOR_CONTROL_MASK);
            _vectors[v] = sink.CreateVector();
        }
    }

    /// <summary>Number of vectors.</summary>
    public int VectorCount { get; }

    /// <summary>Whether the guest enabled MSI-X (Message Control bit 15).</summary>
    public bool Enabled => _enabled;

    /// <summary>
    /// Builds the MSI-X capability body (after ID and next pointer) for
    /// <see cref="PciConfigSpace.AddCapability"/>: Message Control, Table Offset/BIR, PBA Offset/BIR,
    /// with only the enable and function-mask bits writable.
    /// </summary>
    public static (byte[] Body, byte[] WritableMask) CapabilityBody(int vectors, int bar)
    {
        var body = new byte[10];
        var mask = new byte[10];
        BinaryPrimitives.WriteUInt16LittleEndian(body, (ushort)(vectors - 1)); // table size is N-1
        BinaryPrimitives.WriteUInt16LittleEndian(mask, 0xC000);                 // enable, function mask
        BinaryPrimitives.WriteUInt32LittleEndian(body.AsSpan(2), (uint)bar);    // table at offset 0
        BinaryPrimitives.WriteUInt32LittleEndian(body.AsSpan(6), (uint)PbaOffset | (uint)bar);
        return (body, mask);
    }

    /// <summary>Applies the capability's Message Control bits (bit 15 enable, bit 14 function
    /// mask) after the guest wrote them; sends messages that were pending and are now unmasked.</summary>
    public void SetControl(ushort messageControl)
    {
        lock (_lock)
        {
            _enabled = (messageControl & 0x8000) != 0;
            _functionMask = (messageControl & 0x4000) != 0;
            for (int v = 0; v < VectorCount; v++)
                UpdateVectorLocked(v);
        }
        DeliverUnmaskedPending();
    }

    /// <summary>Fires vector <paramref name="vector"/>; out-of-range vectors are ignored.</summary>
    /// <returns>False when MSI-X is disabled (the caller falls back to INTx).</returns>
    public bool Trigger(int vector)
    {
        if (!_enabled)
            return false;
        if ((uint)vector >= (uint)VectorCount)
            return true;
        if (Volatile.Read(ref _live[vector]) != 0)
        {
            _vectors[vector]!.Trigger();
            return true;
        }
        return TriggerSlow(vector);
    }

    /// <summary>A vector that is masked, or has no <see cref="IMsiVector"/>: decided under the lock.</summary>
    private bool TriggerSlow(int vector)
    {
        ulong address = 0;
        uint data = 0;
        bool live;
        lock (_lock)
        {
            if (!_enabled)
                return false;
            if (_functionMask || MaskedLocked(vector))
            {
                _pending[vector / 64] |= 1UL << (vector % 64);
                return true;
            }
            live = _live[vector] != 0; // it may have become live since the lock-free test
            if (!live)
                (address, data) = MessageLocked(vector);
        }
        if (live)
            _vectors[vector]!.Trigger();
        else
            _sink.Deliver(address, data);
        return true;
    }

    /// <summary>
    /// After a change of the enable, function-mask, vector-mask bits or a message: (re)programs the
    /// vector's route when it is deliverable with a new message, and publishes whether it is live.
    /// </summary>
    private void UpdateVectorLocked(int vector)
    {
        var v = _vectors[vector];
        if (v is null)
            return;
        if (!_enabled || _functionMask || MaskedLocked(vector))
        {
            Volatile.Write(ref _live[vector], 0);
            return;
        }
        var message = MessageLocked(vector);
        if (!_programmed[vector] || _message[vector] != message)
        {
            v.Program(message.Address, message.Data);
            _message[vector] = message;
            _programmed[vector] = true;
        }
        Volatile.Write(ref _live[vector], 1);
    }

    /// <inheritdoc/>
    /// <remarks>DWORD and QWORD accesses (§6.8.2: the table is accessed with those); other
    /// widths read 0 and are ignored on write.</remarks>
    public void Read(ulong offset, Span<byte> data)
    {
        data.Clear();
        if ((data.Length != 4 && data.Length != 8) || offset % (ulong)data.Length != 0)
            return;
        lock (_lock)
        {
            if (offset < (ulong)_table.Length)
            {
                _table.AsSpan((int)offset, data.Length).CopyTo(data);
            }
            else if (offset >= PbaOffset && offset - PbaOffset + (ulong)data.Length <= (ulong)_pending.Length * 8)
            {
                Span<byte> pba = stackalloc byte[_pending.Length * 8];
                for (int i = 0; i < _pending.Length; i++)
                    BinaryPrimitives.WriteUInt64LittleEndian(pba[(i * 8)..], _pending[i]);
                pba.Slice((int)(offset - PbaOffset), data.Length).CopyTo(data);
            }
        }
    }

    /// <inheritdoc/>
    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        if ((data.Length != 4 && data.Length != 8) || offset % (ulong)data.Length != 0 || offset >= (ulong)_table.Length)
            return; // the PBA is read-only
        lock (_lock)
        {
            data.CopyTo(_table.AsSpan((int)offset));
            int first = (int)offset / EntrySize;
            int last = ((int)offset + data.Length - 1) / EntrySize;
            for (int v = first; v <= last; v++)
                UpdateVectorLocked(v);
        }
        // A Vector Control write may have unmasked a pending vector.
        DeliverUnmaskedPending();
    }

    private void DeliverUnmaskedPending()
    {
        // Few vectors and rare unmasking: scan, deliver outside the lock one at a time.
        for (int vector = 0; vector < VectorCount; vector++)
        {
            ulong address;
            uint data;
            bool live;
            lock (_lock)
            {
                if (!_enabled || _functionMask)
                    return;
                ulong bit = 1UL << (vector % 64);
                if ((_pending[vector / 64] & bit) == 0 || MaskedLocked(vector))
                    continue;
                _pending[vector / 64] &= ~bit;
                live = _live[vector] != 0;
                (address, data) = MessageLocked(vector);
            }
            if (live)
                _vectors[vector]!.Trigger();
            else
                _sink.Deliver(address, data);
        }
    }

    private bool MaskedLocked(int vector) =>
        (BinaryPrimitives.ReadUInt32LittleEndian(_table.AsSpan(vector * EntrySize + VectorControl)) & VECTOR_CONTROL_MASK) != 0;

    private (ulong Address, uint Data) MessageLocked(int vector)
    {
        ReadOnlySpan<byte> e = _table.AsSpan(vector * EntrySize, EntrySize);
        ulong address = BinaryPrimitives.ReadUInt32LittleEndian(e[MessageAddress..])
            | ((ulong)BinaryPrimitives.ReadUInt32LittleEndian(e[MessageUpperAddress..]) << 32);
        return (address, BinaryPrimitives.ReadUInt32LittleEndian(e[MessageData..]));
    }
}
