using System.Runtime.InteropServices;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>
/// One virtio-blk request as its chain describes it (virtio 1.2 §5.2.6), checked before any I/O
/// (firecracker <c>block/virtio/request.rs</c> <c>parse</c>): the framing (header first, status
/// last, payload direction and size by type), the type and the sector range, with checked
/// arithmetic. <see cref="Parse"/> reads only the header and, for DISCARD/WRITE_ZEROES, the
/// segments; it does no disk I/O and writes nothing.
/// </summary>
public readonly struct BlockRequest
{
    /// <summary>Sector unit of request headers (§5.2.6: always 512).</summary>
    public const int SectorSize = 512;

    /// <summary>Size of struct virtio_blk_outhdr (type, reserved, sector).</summary>
    public const int HeaderSize = 16;

    /// <summary>Size of struct virtio_blk_discard_write_zeroes.</summary>
    public const int SegmentSize = 16;

    // Request types (§5.2.6).
    public const uint VIRTIO_BLK_T_IN = 0;
    public const uint VIRTIO_BLK_T_OUT = 1;
    public const uint VIRTIO_BLK_T_FLUSH = 4;
    public const uint VIRTIO_BLK_T_GET_ID = 8;
    public const uint VIRTIO_BLK_T_DISCARD = 11;
    public const uint VIRTIO_BLK_T_WRITE_ZEROES = 13;

    // Status values (§5.2.6).
    public const byte VIRTIO_BLK_S_OK = 0;
    public const byte VIRTIO_BLK_S_IOERR = 1;
    public const byte VIRTIO_BLK_S_UNSUPP = 2;

    /// <summary>virtio_blk_discard_write_zeroes.flags: the device may deallocate (§5.2.6).</summary>
    public const uint VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

    [StructLayout(LayoutKind.Sequential)]
    private struct virtio_blk_outhdr
    {
        public uint type;
        public uint reserved;
        public ulong sector;
    }

    private BlockRequest(uint type, byte status, string? error, ulong errorValue, ulong offset, uint length,
        GuestAddress statusAddress, int segments)
    {
        Type = type;
        Status = status;
        Error = error;
        ErrorValue = errorValue;
        Offset = offset;
        Length = length;
        StatusAddress = statusAddress;
        SegmentCount = segments;
    }

    /// <summary>The request type (VIRTIO_BLK_T_*), as the driver wrote it.</summary>
    public uint Type { get; }

    /// <summary><see cref="VIRTIO_BLK_S_OK"/> when the request may run; otherwise the status to
    /// answer without running it (IOERR or UNSUPP).</summary>
    public byte Status { get; }

    /// <summary>Why the request was refused (a constant string for the rate-limited log), or null.</summary>
    public string? Error { get; }

    /// <summary>A number that goes with <see cref="Error"/> (a sector, a head, a count).</summary>
    public ulong ErrorValue { get; }

    /// <summary>IN/OUT: the byte offset in the disk (sector × 512, within capacity).</summary>
    public ulong Offset { get; }

    /// <summary>Payload bytes: IN the device-writable bytes before the status, OUT the
    /// device-readable bytes after the header, GET_ID the room for the answer.</summary>
    public uint Length { get; }

    /// <summary>The status byte: the last device-writable byte of the chain.</summary>
    public GuestAddress StatusAddress { get; }

    /// <summary>DISCARD/WRITE_ZEROES: segments copied into the caller's span, all checked.</summary>
    public int SegmentCount { get; }

    /// <summary>
    /// Parses the request in <paramref name="chain"/> (already validated as a descriptor chain by
    /// <see cref="VirtQueue.TryPop"/>) against a disk of <paramref name="capacitySectors"/>.
    /// </summary>
    /// <param name="memory">Guest memory the chain's buffers lie in.</param>
    /// <param name="chain">The request's descriptor chain.</param>
    /// <param name="capacitySectors">The disk's size in 512-byte sectors (virtio 1.2 §5.2.4 capacity).</param>
    /// <param name="readOnly">The disk is read-only (VIRTIO_BLK_F_RO): writes are refused.</param>
    /// <param name="segments">Receives the DISCARD/WRITE_ZEROES segments; its length is the most
    /// segments a request may carry.</param>
    /// <param name="maxSegmentSectors">The most sectors one segment may cover.</param>
    /// <param name="request">The parsed request, when the method returns true.</param>
    /// <returns>False when the chain has no device-writable byte to carry a status: the driver
    /// cannot learn any outcome, so nothing may be done (the chain goes back with length 0).</returns>
    public static bool Parse(GuestMemory memory, DescriptorChain chain, ulong capacitySectors, bool readOnly,
        Span<DiscardSegment> segments, uint maxSegmentSectors, out BlockRequest request)
    {
        ArgumentNullException.ThrowIfNull(chain);
        request = default;
        ReadOnlySpan<ChainSegment> writable = chain.Writable;
        if (writable.Length == 0)
            return false;
        ChainSegment last = writable[^1];
        // Cannot overflow: the chain's segments were checked to lie in guest memory.
        var status = new GuestAddress(last.Address.Value + last.Length - 1);

        var reader = new ChainReader(memory, chain);
        if (!reader.TryRead(out virtio_blk_outhdr header))
        {
            request = Refused(0, status, VIRTIO_BLK_S_IOERR, "virtio-blk: request shorter than its header, head ", chain.Head);
            return true;
        }
        // Read once into locals (style.md §5).
        uint type = header.type;
        ulong sector = header.sector;
        uint dataIn = chain.WritableLength - 1; // device-writable bytes before the status
        uint dataOut = reader.Remaining;         // device-readable bytes after the header

        switch (type)
        {
            case VIRTIO_BLK_T_IN:
                if (dataOut != 0 || dataIn % SectorSize != 0)
                    request = Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: IN request with bad framing, head ", chain.Head);
                else if (!TryRange(capacitySectors, sector, dataIn, out ulong readOffset))
                    request = Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: IN beyond capacity, sector ", sector);
                else
                    request = new BlockRequest(type, VIRTIO_BLK_S_OK, null, 0, readOffset, dataIn, status, 0);
                return true;

            case VIRTIO_BLK_T_OUT:
                if (dataIn != 0 || dataOut % SectorSize != 0)
                    request = Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: OUT request with bad framing, head ", chain.Head);
                else if (readOnly)
                    request = Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: write to a read-only disk, sector ", sector);
                else if (!TryRange(capacitySectors, sector, dataOut, out ulong writeOffset))
                    request = Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: OUT beyond capacity, sector ", sector);
                else
                    request = new BlockRequest(type, VIRTIO_BLK_S_OK, null, 0, writeOffset, dataOut, status, 0);
                return true;

            case VIRTIO_BLK_T_FLUSH:
                request = dataIn != 0 || dataOut != 0
                    ? Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: FLUSH request with bad framing, head ", chain.Head)
                    : new BlockRequest(type, VIRTIO_BLK_S_OK, null, 0, 0, 0, status, 0);
                return true;

            case VIRTIO_BLK_T_GET_ID:
                request = dataOut != 0
                    ? Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: GET_ID request with bad framing, head ", chain.Head)
                    : new BlockRequest(type, VIRTIO_BLK_S_OK, null, 0, 0, dataIn, status, 0);
                return true;

            case VIRTIO_BLK_T_DISCARD:
            case VIRTIO_BLK_T_WRITE_ZEROES:
                request = ParseSegments(ref reader, chain.Head, type, status, dataIn, dataOut, capacitySectors, readOnly, segments, maxSegmentSectors);
                return true;

            default:
                request = Refused(type, status, VIRTIO_BLK_S_UNSUPP, "virtio-blk: unsupported request type ", type);
                return true;
        }
    }

    private static BlockRequest ParseSegments(ref ChainReader reader, ushort head, uint type, GuestAddress status, uint dataIn, uint dataOut,
        ulong capacitySectors, bool readOnly, Span<DiscardSegment> segments, uint maxSegmentSectors)
    {
        bool discard = type == VIRTIO_BLK_T_DISCARD;
        if (readOnly)
            return Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: DISCARD/WRITE_ZEROES on a read-only disk, head ", head);
        if (dataIn != 0 || dataOut == 0 || dataOut % SegmentSize != 0)
            return Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: DISCARD/WRITE_ZEROES request with bad framing, head ", head);
        uint count = dataOut / SegmentSize;
        if (count > (uint)segments.Length)
            return Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: too many DISCARD/WRITE_ZEROES segments: ", count);

        // Copy every segment out of guest memory once and check all of them before the disk is
        // touched, so a bad segment leaves the image unchanged.
        for (int i = 0; i < count; i++)
        {
            if (!reader.TryRead(out segments[i]))
                return Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: short DISCARD/WRITE_ZEROES segment, head ", head);
            uint flags = segments[i].Flags;
            // §5.2.6.2: UNSUPP for unknown flags, and for unmap on a discard.
            if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) != 0 || (discard && flags != 0))
                return Refused(type, status, VIRTIO_BLK_S_UNSUPP, "virtio-blk: unsupported DISCARD/WRITE_ZEROES flags ", flags);
            uint sectors = segments[i].NumSectors;
            if (sectors > maxSegmentSectors || !TryRange(capacitySectors, segments[i].Sector, (ulong)sectors * SectorSize, out _))
                return Refused(type, status, VIRTIO_BLK_S_IOERR, "virtio-blk: DISCARD/WRITE_ZEROES beyond limits, sector ", segments[i].Sector);
        }
        return new BlockRequest(type, VIRTIO_BLK_S_OK, null, 0, 0, dataOut, status, (int)count);
    }

    private static BlockRequest Refused(uint type, GuestAddress status, byte code, string error, ulong value) =>
        new(type, code, error, value, 0, 0, status, 0);

    /// <summary>Checked byte range of a request: sector·512 + length without overflow and within the disk.</summary>
    public static bool TryRange(ulong capacitySectors, ulong sector, ulong length, out ulong offset)
    {
        offset = 0;
        if (sector > capacitySectors)
            return false;
        offset = sector * SectorSize; // cannot overflow: capacity in sectors fits a byte count
        ulong capacityBytes = capacitySectors * SectorSize;
        return length <= capacityBytes - offset;
    }
}
