using System.Buffers.Binary;
using System.Numerics;

namespace KvmSharp.Devices.Pci;

/// <summary>What a Base Address Register decodes.</summary>
public enum PciBarKind
{
    /// <summary>Memory space, 32-bit address (PCI LB 3.0 §6.2.5.1, type 00).</summary>
    Memory32,

    /// <summary>Memory space, 64-bit address: uses this BAR and the next (type 10).</summary>
    Memory64,

    /// <summary>I/O space (bit 0 set).</summary>
    Io,
}

/// <summary>One BAR as the device declared it.</summary>
/// <param name="Index">BAR number 0-5 (the low half for a 64-bit BAR).</param>
/// <param name="Kind">Address space and width.</param>
/// <param name="Size">Power of two: at least 16 bytes for memory, 4 for I/O.</param>
/// <param name="Prefetchable">Memory BAR bit 3.</param>
/// <param name="Region">The registers behind the BAR; offsets are relative to the BAR's address.</param>
public sealed record PciBar(int Index, PciBarKind Kind, ulong Size, bool Prefetchable, IBusDevice Region);

/// <summary>
/// A type 0 (endpoint) PCI configuration space of 256 bytes (PCI Local Bus Specification 3.0
/// §6.1, "Configuration Space Organization"): the predefined header, BARs and a capability list.
/// Each byte has a guest write mask, so read-only fields stay as the device set them and a BAR
/// write of all ones reads back the size mask (§6.2.5.1) without special cases.
/// </summary>
/// <remarks>
/// Not thread-safe by itself: <see cref="PciRoot"/> serialises config accesses. A device that
/// changes its own config space at run time (MSI-X function mask, say) does so under the same
/// rule, from <see cref="IPciDevice.ConfigWritten"/>.
/// </remarks>
public sealed class PciConfigSpace
{
    /// <summary>Bytes of conventional configuration space.</summary>
    public const int Size = 256;

    // Header offsets (PCI LB 3.0 §6.1, Figure 6-1).
    public const int VENDOR_ID = 0x00;
    public const int DEVICE_ID = 0x02;
    public const int COMMAND = 0x04;
    public const int STATUS = 0x06;
    public const int REVISION_ID = 0x08;
    public const int CLASS_PROG = 0x09;
    public const int CLASS_DEVICE = 0x0a;  // subclass, then base class at 0x0b
    public const int CACHE_LINE_SIZE = 0x0c;
    public const int LATENCY_TIMER = 0x0d;
    public const int HEADER_TYPE = 0x0e;
    public const int BASE_ADDRESS_0 = 0x10;
    public const int SUBSYSTEM_VENDOR_ID = 0x2c;
    public const int SUBSYSTEM_ID = 0x2e;
    public const int ROM_ADDRESS = 0x30;
    public const int CAPABILITY_LIST = 0x34;
    public const int INTERRUPT_LINE = 0x3c;
    public const int INTERRUPT_PIN = 0x3d;

    // Command register bits (§6.2.2).
    public const ushort COMMAND_IO = 0x0001;
    public const ushort COMMAND_MEMORY = 0x0002;
    public const ushort COMMAND_MASTER = 0x0004;
    public const ushort COMMAND_PARITY = 0x0040;
    public const ushort COMMAND_SERR = 0x0100;
    public const ushort COMMAND_INTX_DISABLE = 0x0400;
    private const ushort CommandWritable = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY
        | COMMAND_SERR | COMMAND_INTX_DISABLE;

    // Status register bits (§6.2.3).
    public const ushort STATUS_CAP_LIST = 0x0010;

    private const int FirstCapabilityOffset = 0x40; // right after the predefined header
    private const int BarCount = 6;

    private readonly byte[] _bytes = new byte[Size];
    private readonly byte[] _writable = new byte[Size];
    private readonly PciBar?[] _bars = new PciBar?[BarCount];
    private int _nextCapability = FirstCapabilityOffset;
    private int _lastCapability;

    /// <summary>Creates a header with the given identity; everything else reads 0.</summary>
    /// <param name="vendorId">Vendor ID (PCI-SIG assigned).</param>
    /// <param name="deviceId">Device ID.</param>
    /// <param name="classCode">Base class (0x0b), subclass (0x0a), programming interface (0x09) as 0xBBSSPP.</param>
    /// <param name="revision">Revision ID.</param>
    /// <param name="subsystemVendorId">Subsystem vendor ID.</param>
    /// <param name="subsystemId">Subsystem ID.</param>
    public PciConfigSpace(ushort vendorId, ushort deviceId, uint classCode, byte revision = 0,
        ushort subsystemVendorId = 0, ushort subsystemId = 0)
    {
        SetUInt16(VENDOR_ID, vendorId);
        SetUInt16(DEVICE_ID, deviceId);
        _bytes[REVISION_ID] = revision;
        _bytes[CLASS_PROG] = (byte)classCode;
        _bytes[CLASS_DEVICE] = (byte)(classCode >> 8);
        _bytes[CLASS_DEVICE + 1] = (byte)(classCode >> 16);
        SetUInt16(SUBSYSTEM_VENDOR_ID, subsystemVendorId);
        SetUInt16(SUBSYSTEM_ID, subsystemId);
        MarkWritable(COMMAND, 2, CommandWritable);
        _writable[CACHE_LINE_SIZE] = 0xFF;
        _writable[LATENCY_TIMER] = 0xFF;
        _writable[INTERRUPT_LINE] = 0xFF;
    }

    /// <summary>The command register.</summary>
    public ushort Command => GetUInt16(COMMAND);

    /// <summary>The declared BARs (null where unused or the high half of a 64-bit BAR).</summary>
    public IReadOnlyList<PciBar?> Bars => _bars;

    /// <summary>
    /// Declares BAR <paramref name="index"/> and sets its initial address (the VMM assigns
    /// addresses; a guest without firmware keeps them unless it reprograms the BAR).
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">The index, size or address is invalid.</exception>
    /// <exception cref="InvalidOperationException">The BAR (or its high half) is already in use.</exception>
    public PciBar AddBar(int index, PciBarKind kind, ulong size, ulong address, IBusDevice region, bool prefetchable = false)
    {
        ArgumentNullException.ThrowIfNull(region);
        int slots = kind == PciBarKind.Memory64 ? 2 : 1;
        if (index < 0 || index + slots > BarCount)
            throw new ArgumentOutOfRangeException(nameof(index), index, "No such BAR for this kind.");
        ulong minimum = kind == PciBarKind.Io ? 4UL : 16UL;
        ulong maximum = kind switch { PciBarKind.Memory64 => 1UL << 63, PciBarKind.Memory32 => 1UL << 31, _ => 1UL << 16 };
        if (size < minimum || size > maximum || !BitOperations.IsPow2(size))
            throw new ArgumentOutOfRangeException(nameof(size), size, "A BAR size is a power of two within its kind's limits.");
        if (address % size != 0 || (kind != PciBarKind.Memory64 && address + size > 1UL << 32))
            throw new ArgumentOutOfRangeException(nameof(address), address, "A BAR address is aligned to its size and fits its width.");
        for (int i = index; i < index + slots; i++)
            if (_bars[i] is not null || IsHighHalf(i))
                throw new InvalidOperationException($"BAR {i} is already in use.");

        var bar = new PciBar(index, kind, size, prefetchable, region);
        _bars[index] = bar;
        int offset = BASE_ADDRESS_0 + 4 * index;
        ulong mask = ~(size - 1);
        uint flags = kind switch
        {
            PciBarKind.Io => 0x1,
            PciBarKind.Memory64 => 0x4u | (prefetchable ? 0x8u : 0),
            _ => prefetchable ? 0x8u : 0,
        };
        uint lowMask = (uint)mask & (kind == PciBarKind.Io ? 0xFFFF_FFFCu : 0xFFFF_FFF0u);
        SetUInt32(offset, ((uint)address & lowMask) | flags);
        MarkWritable(offset, 4, lowMask);
        if (kind == PciBarKind.Memory64)
        {
            SetUInt32(offset + 4, (uint)(address >> 32));
            MarkWritable(offset + 4, 4, (uint)(mask >> 32));
        }
        return bar;
    }

    /// <summary>The address BAR <paramref name="index"/> currently holds (both halves for 64-bit).</summary>
    public ulong GetBarAddress(int index)
    {
        PciBar bar = _bars[index] ?? throw new ArgumentOutOfRangeException(nameof(index), index, "BAR not declared.");
        int offset = BASE_ADDRESS_0 + 4 * index;
        uint low = GetUInt32(offset);
        return bar.Kind switch
        {
            PciBarKind.Io => low & 0xFFFF_FFFCu,
            PciBarKind.Memory64 => (low & 0xFFFF_FFF0u) | ((ulong)GetUInt32(offset + 4) << 32),
            _ => low & 0xFFFF_FFF0u,
        };
    }

    /// <summary>Sets the interrupt pin (1 = INTA# … 4 = INTD#, 0 = none) and the line firmware would report.</summary>
    public void SetInterrupt(byte pin, byte line)
    {
        _bytes[INTERRUPT_PIN] = pin;
        _bytes[INTERRUPT_LINE] = line;
    }

    /// <summary>
    /// Appends a capability (§6.7) and links it into the list. <paramref name="body"/> is what
    /// follows the ID and next-pointer bytes; <paramref name="writableMask"/> (same length, or
    /// empty for read-only) selects the bits the guest may change.
    /// </summary>
    /// <returns>The capability's offset in configuration space.</returns>
    /// <exception cref="ArgumentException">The masks' lengths differ.</exception>
    /// <exception cref="InvalidOperationException">Configuration space is full.</exception>
    public int AddCapability(byte id, ReadOnlySpan<byte> body, ReadOnlySpan<byte> writableMask = default)
    {
        if (!writableMask.IsEmpty && writableMask.Length != body.Length)
            throw new ArgumentException("The writable mask must cover the body exactly.", nameof(writableMask));
        int offset = _nextCapability;
        int length = 2 + body.Length;
        if (offset + length > Size)
            throw new InvalidOperationException("No room left for the capability in configuration space.");
        _bytes[offset] = id;
        _bytes[offset + 1] = 0;
        body.CopyTo(_bytes.AsSpan(offset + 2));
        if (!writableMask.IsEmpty)
            writableMask.CopyTo(_writable.AsSpan(offset + 2));
        if (_lastCapability == 0)
        {
            _bytes[CAPABILITY_LIST] = (byte)offset;
            SetUInt16(STATUS, (ushort)(GetUInt16(STATUS) | STATUS_CAP_LIST));
        }
        else
        {
            _bytes[_lastCapability + 1] = (byte)offset;
        }
        _lastCapability = offset;
        _nextCapability = (offset + length + 3) & ~3; // capabilities are DWORD aligned
        return offset;
    }

    /// <summary>Guest read of <paramref name="data"/>.Length bytes at <paramref name="offset"/>;
    /// bytes beyond 256 (PCI Express extended space) read 0.</summary>
    public void Read(int offset, Span<byte> data)
    {
        for (int i = 0; i < data.Length; i++)
        {
            int o = offset + i;
            data[i] = (uint)o < Size ? _bytes[o] : (byte)0;
        }
    }

    /// <summary>Guest write: only bits set in the write mask change.</summary>
    public void Write(int offset, ReadOnlySpan<byte> data)
    {
        for (int i = 0; i < data.Length; i++)
        {
            int o = offset + i;
            if ((uint)o >= Size)
                continue;
            byte mask = _writable[o];
            _bytes[o] = (byte)((_bytes[o] & ~mask) | (data[i] & mask));
        }
    }

    /// <summary>Reads one byte (for devices inspecting their capabilities).</summary>
    public byte GetUInt8(int offset) => _bytes[offset];

    /// <summary>Reads a little-endian 16-bit field (for devices inspecting their capabilities).</summary>
    public ushort GetUInt16(int offset) => BinaryPrimitives.ReadUInt16LittleEndian(_bytes.AsSpan(offset));

    /// <summary>Reads a little-endian 32-bit field.</summary>
    public uint GetUInt32(int offset) => BinaryPrimitives.ReadUInt32LittleEndian(_bytes.AsSpan(offset));

    /// <summary>Sets a 16-bit field regardless of the write mask (device-side update).</summary>
    public void SetUInt16(int offset, ushort value) => BinaryPrimitives.WriteUInt16LittleEndian(_bytes.AsSpan(offset), value);

    /// <summary>Sets a 32-bit field regardless of the write mask (device-side update).</summary>
    public void SetUInt32(int offset, uint value) => BinaryPrimitives.WriteUInt32LittleEndian(_bytes.AsSpan(offset), value);

    private void MarkWritable(int offset, int length, uint mask)
    {
        for (int i = 0; i < length; i++)
            _writable[offset + i] = (byte)(mask >> (8 * i));
    }

    private bool IsHighHalf(int index) => index > 0 && _bars[index - 1]?.Kind == PciBarKind.Memory64;
}
