namespace KvmSharp.Devices;

/// <summary>
/// A device model reached through a <see cref="Bus"/> (port I/O or MMIO). Device models see only
/// these calls and their interrupt lines, never a KVM file descriptor (design.md, "Layers").
/// </summary>
/// <remarks>
/// Called synchronously on vCPU threads, possibly several at once: an implementation serialises
/// its own state with its own lock, returns quickly and never blocks on guest-independent work
/// (style.md §6). Guest-caused bad input (an unknown register, an odd access width) is absorbed,
/// never thrown.
/// </remarks>
public interface IBusDevice
{
    /// <summary>Handles a guest read of <paramref name="data"/>.Length bytes (1, 2, 4 or 8).</summary>
    /// <param name="offset">Address of the access relative to the base the device was inserted at.</param>
    /// <param name="data">Filled by the device; the whole span lies inside the device's range.</param>
    void Read(ulong offset, Span<byte> data);

    /// <summary>Handles a guest write of <paramref name="data"/>.Length bytes (1, 2, 4 or 8).</summary>
    /// <param name="offset">Address of the access relative to the base the device was inserted at.</param>
    /// <param name="data">The bytes written, little-endian; the whole span lies inside the device's range.</param>
    void Write(ulong offset, ReadOnlySpan<byte> data);
}
