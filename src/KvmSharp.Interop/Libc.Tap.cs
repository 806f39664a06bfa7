using System.Runtime.InteropServices;
using System.Text;

namespace KvmSharp.Interop;

/// <summary>Offloads a TAP may hand to (or take from) user space in its vnet header
/// (TUN_F_* in include/uapi/linux/if_tun.h, set with TUNSETOFFLOAD).</summary>
[Flags]
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1714:Flags enums should have plural names", Justification = "Named after TUN_F_*.")]
public enum TapOffloads : uint
{
    /// <summary>No offloads: every frame read from the TAP is complete and checksummed.</summary>
    None = 0,

    /// <summary>TUN_F_CSUM: frames may carry a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM).</summary>
    Csum = 0x01,

    /// <summary>TUN_F_TSO4: TCP over IPv4 segmentation offload (requires <see cref="Csum"/>).</summary>
    Tso4 = 0x02,

    /// <summary>TUN_F_TSO6: TCP over IPv6 segmentation offload (requires <see cref="Csum"/>).</summary>
    Tso6 = 0x04,

    /// <summary>TUN_F_TSO_ECN: TSO frames may have the ECN/CWR bit set.</summary>
    TsoEcn = 0x08,

    /// <summary>TUN_F_UFO: UDP fragmentation offload (accepted and ignored by current kernels).</summary>
    Ufo = 0x10,
}

/// <summary>
/// TAP network interfaces through /dev/net/tun (Documentation/networking/tuntap.rst): an fd that
/// reads and writes whole Ethernet frames, each preceded by a virtio-net header when
/// IFF_VNET_HDR is on.
/// </summary>
public static unsafe class Tap
{
    /// <summary>Size of the vnet header this class configures: struct virtio_net_hdr_v1 with
    /// num_buffers (virtio 1.2 §5.1.6), as virtio-net with VERSION_1 uses.</summary>
    public const int VnetHeaderSize = 12;

    /// <summary>IFNAMSIZ: interface names are at most 15 bytes plus the terminating NUL.</summary>
    public const int InterfaceNameSize = 16;

    // include/uapi/linux/if_tun.h. TUNSETIFF is declared with sizeof(int) although it takes a
    // struct ifreq: the kernel's header says so, and the number must match it.
    private const uint TunIoctlType = 'T';
    internal static readonly nuint TUNSETIFF = Libc.IOW(TunIoctlType, 202, 4);
    internal static readonly nuint TUNSETOFFLOAD = Libc.IOW(TunIoctlType, 208, 4);
    internal static readonly nuint TUNGETIFF = Libc.IOR(TunIoctlType, 210, 4);
    internal static readonly nuint TUNSETVNETHDRSZ = Libc.IOW(TunIoctlType, 216, 4);

    private const short IFF_TAP = 0x0002;
    private const short IFF_NO_PI = 0x1000;
    private const short IFF_VNET_HDR = 0x4000;

    /// <summary>struct ifreq (include/uapi/linux/if.h): the name, then a 24-byte union of which
    /// TUNSETIFF uses ifr_flags. 40 bytes on x86-64.</summary>
#pragma warning disable CS8981 // the kernel's name, for diffing against if.h (style.md §2)
    [StructLayout(LayoutKind.Sequential, Size = 40)]
    public struct ifreq
    {
        public fixed byte ifr_name[InterfaceNameSize];
        public short ifr_flags;
    }
#pragma warning restore CS8981

    /// <summary>
    /// Opens /dev/net/tun non-blocking and close-on-exec and attaches it to TAP
    /// <paramref name="name"/>, creating the interface when it does not exist (it then lives
    /// as long as the fd, unless made persistent elsewhere). With a null or empty name the
    /// kernel picks one ("tap%d").
    /// </summary>
    /// <param name="name">Interface name, at most 15 bytes of UTF-8; may contain a printf-style
    /// "%d" that the kernel fills in.</param>
    /// <param name="vnetHeader">Prefix every frame with a <see cref="VnetHeaderSize"/>-byte
    /// virtio-net header (IFF_VNET_HDR + TUNSETVNETHDRSZ). Offloads start off
    /// (<see cref="SetOffloads"/>).</param>
    /// <returns>The fd and the interface's actual name.</returns>
    /// <exception cref="ArgumentException">The name is too long or contains a NUL.</exception>
    /// <exception cref="NativeException">open, TUNSETIFF (e.g. EBUSY: the TAP is attached
    /// elsewhere; EPERM: no CAP_NET_ADMIN), TUNSETVNETHDRSZ or TUNSETOFFLOAD failed.</exception>
    public static (FileDescriptor Fd, string InterfaceName) Open(string? name, bool vnetHeader)
    {
        var request = default(ifreq);
        if (!string.IsNullOrEmpty(name))
        {
            if (name.Contains('\0', StringComparison.Ordinal))
                throw new ArgumentException("An interface name cannot contain NUL.", nameof(name));
            int length = Encoding.UTF8.GetByteCount(name);
            if (length >= InterfaceNameSize)
                throw new ArgumentException($"Interface name '{name}' is longer than {InterfaceNameSize - 1} bytes.", nameof(name));
            // SAFETY: ifr_name is a fixed buffer of InterfaceNameSize bytes inside the local request, and
            // the name is shorter (checked above), so the zeroed last byte stays its NUL.
            Encoding.UTF8.GetBytes(name, new Span<byte>(request.ifr_name, InterfaceNameSize));
        }
        request.ifr_flags = (short)(IFF_TAP | IFF_NO_PI | (vnetHeader ? IFF_VNET_HDR : 0));

        FileDescriptor fd = Libc.Open("/dev/net/tun", Libc.O_RDWR | Libc.O_NONBLOCK);
        try
        {
            // SAFETY: &request is a local struct ifreq (40 bytes, the kernel's sizeof; TUNSETIFF's number
            // says 4, see above); the kernel writes the interface name back into it during the call only.
            if (Libc.ioctl(fd.Fd, TUNSETIFF, &request) < 0)
                Libc.ThrowNative($"TUNSETIFF({(string.IsNullOrEmpty(name) ? "tap%d" : name)})", Libc.LastErrno);
            string actual = NameOf(request.ifr_name);
            if (vnetHeader)
            {
                int size = VnetHeaderSize;
                // SAFETY: &size is an int local, the argument TUNSETVNETHDRSZ reads.
                if (Libc.ioctl(fd.Fd, TUNSETVNETHDRSZ, &size) < 0)
                    Libc.ThrowNative($"TUNSETVNETHDRSZ({actual})", Libc.LastErrno);
                SetOffloads(fd, TapOffloads.None, actual);
            }
            return (fd, actual);
        }
        catch
        {
            fd.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Tells the TAP which offloads the reader accepts (TUNSETOFFLOAD): for virtio-net, the
    /// guest's negotiated GUEST_CSUM/GUEST_TSO4/GUEST_TSO6/GUEST_ECN/GUEST_UFO. Frames the
    /// writer sends may use offloads regardless.
    /// </summary>
    /// <exception cref="NativeException">TUNSETOFFLOAD failed (EINVAL: TSO without CSUM, or an
    /// fd opened without a vnet header).</exception>
    public static void SetOffloads(FileDescriptor fd, TapOffloads offloads, string? interfaceName = null)
    {
        ArgumentNullException.ThrowIfNull(fd);
        if (Libc.ioctl(fd.Fd, TUNSETOFFLOAD, (nint)(uint)offloads) < 0)
            Libc.ThrowNative($"TUNSETOFFLOAD({interfaceName ?? "tap"})", Libc.LastErrno);
    }

    /// <summary>Reads one frame (with its vnet header, if configured).</summary>
    /// <returns>The frame's length (may exceed <paramref name="buffer"/>'s: the kernel then
    /// truncated it), or -errno: -EAGAIN when no frame is queued.</returns>
    public static int Read(FileDescriptor fd, Span<byte> buffer)
    {
        ArgumentNullException.ThrowIfNull(fd);
        return Libc.Read(fd.Fd, buffer);
    }

    /// <summary>Writes one frame (with its vnet header, if configured).</summary>
    /// <returns>The bytes written (the whole frame), or -errno (EINVAL: a malformed vnet header
    /// or frame; EIO: the interface is down).</returns>
    public static int Write(FileDescriptor fd, ReadOnlySpan<byte> frame)
    {
        ArgumentNullException.ThrowIfNull(fd);
        // SAFETY: p pins frame; write(2) reads frame.Length bytes from it.
        fixed (byte* p = frame)
        {
            while (true)
            {
                nint n = Libc.write(fd.Fd, p, (nuint)frame.Length);
                if (n >= 0)
                    return (int)n;
                int e = Libc.LastErrno;
                if (e != Libc.EINTR)
                    return -e;
            }
        }
    }

    private static string NameOf(byte* name)
    {
        // SAFETY: callers pass an ifr_name, a fixed buffer of InterfaceNameSize bytes.
        var bytes = new ReadOnlySpan<byte>(name, InterfaceNameSize);
        int end = bytes.IndexOf((byte)0);
        return Encoding.UTF8.GetString(end < 0 ? bytes : bytes[..end]);
    }
}
