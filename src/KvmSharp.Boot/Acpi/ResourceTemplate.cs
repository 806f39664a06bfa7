namespace KvmSharp.Boot.Acpi;

/// <summary>
/// Builds the byte list of an ASL <c>ResourceTemplate ()</c> (ACPI 6.5 §6.4, "Resource Data
/// Types for ACPI"): small and large resource descriptors closed by an End Tag. Put the result
/// in a Buffer with <see cref="AmlBuilder.Buffer"/>.
/// </summary>
public sealed class ResourceTemplate
{
    // Small item tags (§6.4.2): byte 0 = tag << 3 | length.
    private const byte IrqNoFlagsTag = 0x22; // IRQ descriptor, 2 bytes (no information byte)
    private const byte IoPortTag = 0x47;     // I/O port descriptor, 7 bytes
    private const byte EndTag = 0x79;        // End tag, 1 byte (checksum)

    // Large item names (§6.4.3).
    private const byte Memory32FixedTag = 0x86;
    private const byte DWordAddressTag = 0x87;
    private const byte WordAddressTag = 0x88;
    private const byte ExtendedIrqTag = 0x89;
    private const byte QWordAddressTag = 0x8A;

    // Address space descriptor resource types and flags (§6.4.3.5).
    private const byte ResourceTypeMemory = 0, ResourceTypeIo = 1, ResourceTypeBus = 2;
    private const byte GeneralFlagsProducerMinMaxFixed = 0x0C; // _MAF | _MIF, positive decode, producer+consumer
    private const byte IoRangeEntire = 0x03;                   // _RNG: ISA and non-ISA ranges
    private const byte MemReadWrite = 0x01;
    private const byte MemCacheable = 0x02;                    // _MEM = 1

    private readonly List<byte> _b = new();

    /// <summary>The descriptors followed by an End Tag whose checksum byte is 0 ("treat as valid").</summary>
    public byte[] ToArray()
    {
        var r = new List<byte>(_b) { EndTag, 0 };
        return r.ToArray();
    }

    /// <summary><c>IO (Decode16, min, max, alignment, length)</c>: an I/O port descriptor with 16-bit decode.</summary>
    public ResourceTemplate Io(ushort minimum, ushort maximum, byte alignment, byte length)
    {
        _b.Add(IoPortTag);
        _b.Add(1); // _DEC: 16-bit decode
        Add16(minimum);
        Add16(maximum);
        _b.Add(alignment);
        _b.Add(length);
        return this;
    }

    /// <summary><c>IRQNoFlags () { irq, … }</c>: ISA IRQs, edge-triggered, active high, exclusive.</summary>
    /// <exception cref="ArgumentOutOfRangeException">An IRQ is not 0–15.</exception>
    public ResourceTemplate IrqNoFlags(params ReadOnlySpan<int> irqs)
    {
        ushort mask = 0;
        foreach (int irq in irqs)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(irq);
            ArgumentOutOfRangeException.ThrowIfGreaterThan(irq, 15);
            mask |= (ushort)(1 << irq);
        }
        _b.Add(IrqNoFlagsTag);
        Add16(mask);
        return this;
    }

    /// <summary><c>Memory32Fixed (ReadWrite|ReadOnly, base, length)</c>.</summary>
    public ResourceTemplate Memory32Fixed(uint baseAddress, uint length, bool readWrite = true)
    {
        LargeHeader(Memory32FixedTag, 9);
        _b.Add(readWrite ? (byte)1 : (byte)0);
        Add32(baseAddress);
        Add32(length);
        return this;
    }

    /// <summary><c>WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, count)</c>.</summary>
    public ResourceTemplate WordBusNumber(ushort minimum, ushort maximum) =>
        WordAddress(ResourceTypeBus, 0, minimum, maximum);

    /// <summary><c>WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, length)</c>.</summary>
    public ResourceTemplate WordIo(ushort minimum, ushort maximum) =>
        WordAddress(ResourceTypeIo, IoRangeEntire, minimum, maximum);

    /// <summary><c>DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable|NonCacheable, ReadWrite, 0, min, max, 0, length)</c>.</summary>
    /// <exception cref="ArgumentException"><paramref name="maximum"/> is below <paramref name="minimum"/>.</exception>
    public ResourceTemplate DWordMemory(uint minimum, uint maximum, bool cacheable)
    {
        if (maximum < minimum)
            throw new ArgumentException($"Memory range 0x{minimum:x}-0x{maximum:x} is empty.", nameof(maximum));
        LargeHeader(DWordAddressTag, 23);
        _b.Add(ResourceTypeMemory);
        _b.Add(GeneralFlagsProducerMinMaxFixed);
        _b.Add((byte)(MemReadWrite | (cacheable ? MemCacheable : 0)));
        Add32(0);                          // granularity
        Add32(minimum);
        Add32(maximum);
        Add32(0);                          // translation offset
        Add32(maximum - minimum + 1);      // length
        return this;
    }

    /// <summary><c>QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable|NonCacheable, ReadWrite, 0, min, max, 0, length)</c>.</summary>
    /// <exception cref="ArgumentException"><paramref name="maximum"/> is below <paramref name="minimum"/>, or the range is all of 2^64.</exception>
    public ResourceTemplate QWordMemory(ulong minimum, ulong maximum, bool cacheable)
    {
        if (maximum < minimum || (minimum == 0 && maximum == ulong.MaxValue))
            throw new ArgumentException($"Memory range 0x{minimum:x}-0x{maximum:x} is empty or too large.", nameof(maximum));
        LargeHeader(QWordAddressTag, 43);
        _b.Add(ResourceTypeMemory);
        _b.Add(GeneralFlagsProducerMinMaxFixed);
        _b.Add((byte)(MemReadWrite | (cacheable ? MemCacheable : 0)));
        Add64(0);
        Add64(minimum);
        Add64(maximum);
        Add64(0);
        Add64(maximum - minimum + 1);
        return this;
    }

    /// <summary>
    /// <c>Interrupt (ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared) { gsi, … }</c>:
    /// the Extended Interrupt Descriptor (§6.4.3.6), 1–255 interrupt numbers.
    /// </summary>
    /// <exception cref="ArgumentException">No interrupts, or more than 255.</exception>
    public ResourceTemplate Interrupt(bool levelTriggered, bool activeLow, bool shared, params ReadOnlySpan<uint> interrupts)
    {
        if (interrupts.Length is 0 or > 255)
            throw new ArgumentException($"An Interrupt descriptor holds 1 to 255 interrupts, not {interrupts.Length}.", nameof(interrupts));
        LargeHeader(ExtendedIrqTag, (ushort)(2 + 4 * interrupts.Length));
        // Flags: bit 0 consumer, bit 1 edge (1) / level (0), bit 2 active low, bit 3 shared.
        _b.Add((byte)(0x01 | (levelTriggered ? 0 : 0x02) | (activeLow ? 0x04 : 0) | (shared ? 0x08 : 0)));
        _b.Add((byte)interrupts.Length);
        foreach (uint i in interrupts)
            Add32(i);
        return this;
    }

    private ResourceTemplate WordAddress(byte resourceType, byte typeFlags, ushort minimum, ushort maximum)
    {
        if (maximum < minimum || (minimum == 0 && maximum == ushort.MaxValue))
            throw new ArgumentException($"Range 0x{minimum:x}-0x{maximum:x} is empty, or too large for a 16-bit length.", nameof(maximum));
        LargeHeader(WordAddressTag, 13);
        _b.Add(resourceType);
        _b.Add(GeneralFlagsProducerMinMaxFixed);
        _b.Add(typeFlags);
        Add16(0);                                   // granularity
        Add16(minimum);
        Add16(maximum);
        Add16(0);                                   // translation offset
        Add16((ushort)(maximum - minimum + 1));     // length
        return this;
    }

    private void LargeHeader(byte tag, ushort length)
    {
        _b.Add(tag);
        Add16(length);
    }

    private void Add16(ushort v)
    {
        _b.Add((byte)v);
        _b.Add((byte)(v >> 8));
    }

    private void Add32(uint v)
    {
        for (int i = 0; i < 4; i++)
            _b.Add((byte)(v >> (8 * i)));
    }

    private void Add64(ulong v)
    {
        for (int i = 0; i < 8; i++)
            _b.Add((byte)(v >> (8 * i)));
    }
}
