using System.Buffers.Binary;

namespace KvmSharp.Devices.Pci;

/// <summary>
/// Where MSI/MSI-X messages go: the VMM implements it (KVM_SIGNAL_MSI, or a GSI route plus an
/// irqfd per vector). Thread-safe, never blocks.
/// </summary>
public interface IMsiSink
{
    /// <summary>Delivers one message: the guest-programmed address and data (PCI LB 3.0 §6.8.2.6-8).</summary>
    void Deliver(ulong address, uint data);
}

/// <summary>
/// An MSI-X table and Pending Bit Array (PCI LB 3.0 §6.8.2), as one BAR region: the table at
/// offset 0 (16 bytes per vector), the PBA at <see cref="PbaOffset"/>. Also owns the capability's
/// enable and function-mask bits, which the device copies in from configuration space with
/// <see cref="SetControl"/>.
/// </summary>
/// <remarks>
/// <para>A vector fires with <see cref="Trigger"/>. While MSI-X is enabled and neither the
/// function nor the vector is masked, the message goes to the <see cref="IMsiSink"/>; while
/// masked, the vector's pending bit is set instead, and the message is sent when it is unmasked
/// (§6.8.2.9). Every vector starts masked (§6.8.2.9, "Vector Control").</para>
/// <para>Threads: table accesses (vCPU threads) and <see cref="Trigger"/> (device threads)
/// serialise on one lock; <see cref="IMsiSink.Deliver"/> is called after it is released.</para>
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

    // Guards _table, _pending, _enabled, _functionMask.
    private readonly Lock _lock = new();
    private bool _enabled;
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
        for (int v = 0; v < vectors; v++)
            BinaryPrimitives.WriteUInt32LittleEndian(_table.AsSpan(v * EntrySize + VectorControl), VECTOR_CONTROL_MASK);
    }

    /// <summary>Number of vectors.</summary>
    public int VectorCount { get; }

    /// <summary>Whether the guest enabled MSI-X (Message Control bit 15).</summary>
    public bool Enabled
    {
        get { lock (_lock) return _enabled; }
    }

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
        }
        DeliverUnmaskedPending();
    }

    /// <summary>Fires vector <paramref name="vector"/>; out-of-range vectors are ignored.</summary>
    /// <returns>False when MSI-X is disabled (the caller falls back to INTx).</returns>
    public bool Trigger(int vector)
    {
        ulong address;
        uint data;
        lock (_lock)
        {
            if (!_enabled)
                return false;
            if ((uint)vector >= (uint)VectorCount)
                return true;
            if (_functionMask || MaskedLocked(vector))
            {
                _pending[vector / 64] |= 1UL << (vector % 64);
                return true;
            }
            (address, data) = MessageLocked(vector);
        }
        _sink.Deliver(address, data);
        return true;
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
            data.CopyTo(_table.AsSpan((int)offset));
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
            lock (_lock)
            {
                if (!_enabled || _functionMask)
                    return;
                ulong bit = 1UL << (vector % 64);
                if ((_pending[vector / 64] & bit) == 0 || MaskedLocked(vector))
                    continue;
                _pending[vector / 64] &= ~bit;
                (address, data) = MessageLocked(vector);
            }
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
