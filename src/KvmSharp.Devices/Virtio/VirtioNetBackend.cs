using KvmSharp.Interop;

namespace KvmSharp.Devices.Virtio;

/// <summary>
/// Where a <see cref="VirtioNet"/> sends and receives frames: a TAP (<see cref="TapNetBackend"/>)
/// or, in tests, an in-memory queue. Every frame carries the 12-byte virtio_net_hdr_v1 in front
/// (virtio 1.2 §5.1.6), exactly as a TAP with IFF_VNET_HDR and TUNSETVNETHDRSZ 12 does.
/// </summary>
/// <remarks>Calls never block. <see cref="Read"/> is called under the device's receive lock,
/// <see cref="Write"/> under its transmit lock (possibly concurrently with each other),
/// <see cref="SetOffloads"/> under both.</remarks>
public interface INetBackend
{
    /// <summary>Reads one frame (vnet header + Ethernet frame) into <paramref name="buffer"/>.</summary>
    /// <returns>The frame's length; a length larger than the buffer means the frame was truncated
    /// (the device drops it). A negative errno when no frame can be read: -EAGAIN when none is
    /// queued.</returns>
    int Read(Span<byte> buffer);

    /// <summary>Writes one frame (vnet header + Ethernet frame).</summary>
    /// <returns>Non-negative on success; a negative errno when the frame was not sent (the device
    /// drops it and counts it).</returns>
    int Write(ReadOnlySpan<byte> frame);

    /// <summary>The offloads the guest accepts on receive (from its negotiated GUEST_* features):
    /// frames returned by <see cref="Read"/> may use these and no others.</summary>
    /// <exception cref="IOException">The back end cannot honour them.</exception>
    void SetOffloads(TapOffloads offloads);
}

/// <summary>
/// An <see cref="INetBackend"/> over a TAP fd from <see cref="Tap.Open"/> (non-blocking, vnet
/// header on). The VMM polls <see cref="Fd"/> for readability (EPOLLIN, edge-triggered is fine:
/// <see cref="VirtioNet.ProcessRx"/> reads until the TAP is empty, the guest has no buffers, or
/// its budget ends, and says which).
/// </summary>
public sealed class TapNetBackend : INetBackend, IDisposable
{
    private readonly FileDescriptor _fd;

    /// <summary>Takes ownership of <paramref name="fd"/>, a TAP opened with a vnet header.</summary>
    public TapNetBackend(FileDescriptor fd, string interfaceName)
    {
        ArgumentNullException.ThrowIfNull(fd);
        ArgumentNullException.ThrowIfNull(interfaceName);
        _fd = fd;
        InterfaceName = interfaceName;
    }

    /// <summary>Opens (or creates) TAP <paramref name="name"/>; null lets the kernel pick one.</summary>
    /// <exception cref="NativeException">See <see cref="Tap.Open"/>.</exception>
    /// <exception cref="ArgumentException">The name is invalid.</exception>
    public static TapNetBackend Open(string? name)
    {
        (FileDescriptor fd, string actual) = Tap.Open(name, vnetHeader: true);
        return new TapNetBackend(fd, actual);
    }

    /// <summary>The interface name (e.g. "tap0").</summary>
    public string InterfaceName { get; }

    /// <summary>The raw TAP fd, for the VMM's epoll set. Valid until <see cref="Dispose"/>.</summary>
    public int Fd => _fd.Fd;

    /// <inheritdoc/>
    public int Read(Span<byte> buffer) => Tap.Read(_fd, buffer);

    /// <inheritdoc/>
    public int Write(ReadOnlySpan<byte> frame) => Tap.Write(_fd, frame);

    /// <inheritdoc/>
    /// <exception cref="NativeException">TUNSETOFFLOAD failed.</exception>
    public void SetOffloads(TapOffloads offloads) => Tap.SetOffloads(_fd, offloads, InterfaceName);

    /// <summary>Closes the fd; a TAP this process created disappears with it.</summary>
    public void Dispose() => _fd.Dispose();
}
