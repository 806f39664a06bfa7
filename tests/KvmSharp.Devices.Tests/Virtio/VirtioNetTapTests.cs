using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using KvmSharp.Devices.Virtio;
using KvmSharp.Interop;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

/// <summary>
/// VirtioNet over a real TAP. The test moves its TAP into a network namespace it creates (the fd
/// stays attached), gives it 192.0.2.1/24 there (TEST-NET-1, RFC 5737) and has the mock guest at
/// 192.0.2.2 talk to that namespace's kernel through the device's transmit and receive paths.
/// The namespace keeps every frame off the host's own networks: a host may itself use a
/// documentation range (this one has 192.0.2.2/24 with gateway 192.0.2.1 on eth0), and the
/// same addresses in the root namespace would hijack its default route. Needs root and iproute2
/// (and bash for /dev/udp); skipped only when /dev/net/tun is missing.
/// </summary>
public sealed class VirtioNetTapTests : IDisposable
{
    private const ulong RxDesc = 0x1000, RxAvail = 0x2000, RxUsed = 0x3000;
    private const ulong TxDesc = 0x4000, TxAvail = 0x5000, TxUsed = 0x6000;
    private const ulong RxData = 0x10000, TxData = 0x40000;
    private const int RxBufferSize = 2048;
    private static readonly byte[] s_guestMac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    private static readonly byte[] s_guestIp = [192, 0, 2, 2];
    private static readonly byte[] s_hostIp = [192, 0, 2, 1];
    private static int s_counter;

    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);
    private readonly CountingVirtioInterrupt _irq = new();
    private NetQueueDriver? _rx;
    private NetQueueDriver? _tx;
    private ushort _seenUsed;

    public void Dispose() => _memory.Dispose();

    private static void Ip(string arguments, bool check = true) => Run("ip", arguments, check);

    private static void Run(string program, string arguments, bool check = true)
    {
        var psi = new ProcessStartInfo(program, arguments) { RedirectStandardError = true, RedirectStandardOutput = true };
        using Process p = Process.Start(psi)!;
        string error = p.StandardError.ReadToEnd();
        p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        if (check && p.ExitCode != 0)
            throw new InvalidOperationException($"{program} {arguments} failed ({p.ExitCode}): {error}");
    }

    [Fact]
    public void Open_BadNames_AreRefusedBeforeTheKernel()
    {
        Assert.Throws<ArgumentException>(() => Tap.Open("sixteen-bytes-xx", vnetHeader: true));
        Assert.Throws<ArgumentException>(() => Tap.Open("a\0b", vnetHeader: true));
    }

    [Fact]
    public void Open_TwiceWithoutMultiQueue_ReportsTheNameAndErrno()
    {
        Assert.SkipUnless(File.Exists("/dev/net/tun"), "/dev/net/tun is missing: no TUN/TAP support here");
        string name = $"ksnt{Environment.ProcessId}x{Interlocked.Increment(ref s_counter)}";
        using TapNetBackend first = TapNetBackend.Open(name);
        Assert.Equal(name, first.InterfaceName);
        var e = Assert.Throws<NativeException>(() => Tap.Open(name, vnetHeader: true));
        Assert.Equal($"TUNSETIFF({name})", e.Operation);
        Assert.Equal(16, e.Errno); // EBUSY: attached elsewhere
        Assert.StartsWith($"TUNSETIFF({name}) failed: Device or resource busy", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Open_WithoutName_KernelPicksTapN()
    {
        Assert.SkipUnless(File.Exists("/dev/net/tun"), "/dev/net/tun is missing: no TUN/TAP support here");
        using TapNetBackend tap = TapNetBackend.Open(null);
        Assert.StartsWith("tap", tap.InterfaceName, StringComparison.Ordinal);
        Assert.True(tap.Fd >= 0);
        Assert.Equal(-Libc.EAGAIN, tap.Read(new byte[2048])); // non-blocking, nothing queued (interface down)
    }

    [Fact]
    public void GuestTalksToAKernel_Arp_Ping_UdpWithChecksumOffload_BothWays()
    {
        Assert.SkipUnless(File.Exists("/dev/net/tun"), "/dev/net/tun is missing: no TUN/TAP support here");
        int n = Interlocked.Increment(ref s_counter);
        string name = $"ksnt{Environment.ProcessId}y{n}";
        string ns = $"kvmsharp-t{Environment.ProcessId}-{n}";
        TapNetBackend backend = TapNetBackend.Open(name);
        var net = new VirtioNet(backend, s_guestMac, 16);
        bool nsCreated = false;
        try
        {
            Ip($"netns add {ns}");
            nsCreated = true;
            Ip($"link set {name} netns {ns}");
            Ip($"-n {ns} addr add 192.0.2.1/24 dev {name}");
            Ip($"-n {ns} link set {name} up");

            _rx = new NetQueueDriver(_memory, RxDesc, RxAvail, RxUsed);
            _tx = new NetQueueDriver(_memory, TxDesc, TxAvail, TxUsed);
            ulong features = VirtioFeatures.VERSION_1 | VirtioNetFeatures.MRG_RXBUF | VirtioNetFeatures.CSUM | VirtioNetFeatures.GUEST_CSUM;
            Assert.True(net.Activate(_memory, features, [_rx.Queue, _tx.Queue], _irq)); // TUNSETOFFLOAD(CSUM) for real
            for (ushort i = 0; i < 16; i++)
                PostRx(i);

            // ARP: who has 192.0.2.1? The namespace's kernel answers with the TAP's MAC.
            Send(net, ArpFrame(op: 1, targetMac: new byte[6], targetIp: s_hostIp, destination: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff]));
            byte[] reply = Pump(net, f => EtherType(f) == 0x0806 && BinaryPrimitives.ReadUInt16BigEndian(f.AsSpan(20)) == 2
                && f.AsSpan(28, 4).SequenceEqual(s_hostIp));
            byte[] hostMac = reply[22..28];
            Assert.Equal(s_guestMac, reply[0..6]);

            // ICMP echo to 192.0.2.1 and its reply.
            byte[] payload = "kvmsharp virtio-net echo"u8.ToArray();
            Send(net, IcmpEcho(hostMac, id: 0x4b53, seq: 1, payload));
            byte[] echo = Pump(net, f => IsIcmpFromHost(f) && f[34] == 0);
            Assert.Equal(0x4b53, BinaryPrimitives.ReadUInt16BigEndian(echo.AsSpan(38)));
            Assert.Equal(payload, echo[42..(42 + payload.Length)]);
            Assert.Equal(0, echo[0] & 1); // a complete frame: no partial checksum

            // UDP to a closed port with VIRTIO_NET_HDR_F_NEEDS_CSUM and a checksum field holding
            // only the pseudo-header sum: the kernel answers "port unreachable" only if the TAP
            // honoured the vnet header; a datagram with a bad checksum is dropped silently.
            byte[] udpPayload = "offloaded checksum"u8.ToArray();
            Send(net, UdpPartialChecksum(hostMac, 40000, 9, udpPayload), headerIncluded: true);
            byte[] unreachable = Pump(net, f => IsIcmpFromHost(f) && f[34] == 3);
            Assert.Equal(3, unreachable[35]); // port unreachable
            Assert.Equal(9, BinaryPrimitives.ReadUInt16BigEndian(unreachable.AsSpan(42 + 20 + 2))); // quoted UDP header

            // The other way: a datagram from the namespace reaches the guest with NEEDS_CSUM,
            // because the guest accepted GUEST_CSUM and the TAP was told (TUN_F_CSUM).
            Run("ip", $"netns exec {ns} bash -c \"printf answer > /dev/udp/192.0.2.2/40000\"");
            byte[] answer = Pump(net, f => EtherType(f) == 0x0800 && f[23] == 17 && BinaryPrimitives.ReadUInt16BigEndian(f.AsSpan(36)) == 40000,
                withHeader: true);
            Assert.Equal(1, answer[0] & 1); // VIRTIO_NET_HDR_F_NEEDS_CSUM
            Assert.Equal(34, BinaryPrimitives.ReadUInt16LittleEndian(answer.AsSpan(6))); // csum_start: the UDP header
            Assert.Equal(6, BinaryPrimitives.ReadUInt16LittleEndian(answer.AsSpan(8)));  // csum_offset
            Assert.Equal("answer"u8.ToArray(), answer[(12 + 42)..]);

            Assert.Equal(0, net.TxErrors);
            Assert.Equal(0, net.BadChains);
            Assert.True(net.RxFrames >= 4);
            Assert.True(_irq.Rx > 0);
        }
        finally
        {
            net.Reset();
            backend.Dispose(); // a TAP this process created goes away with its fd
            if (nsCreated)
                Ip($"netns del {ns}", check: false);
            Ip($"link del {name}", check: false); // in case it never left this namespace
        }
    }

    private static bool IsIcmpFromHost(byte[] f) =>
        EtherType(f) == 0x0800 && f[23] == 1 && f.AsSpan(26, 4).SequenceEqual(s_hostIp) && f.AsSpan(30, 4).SequenceEqual(s_guestIp);

    private void PostRx(ushort head)
    {
        _rx!.WriteDesc(head, RxData + 0x1000UL * head, RxBufferSize, NetQueueDriver.F_WRITE, 0);
        _rx.Publish(head);
    }

    private void Send(VirtioNet net, byte[] frame)
    {
        long before = net.TxFrames;
        var withHeader = new byte[12 + frame.Length];
        frame.CopyTo(withHeader, 12);
        Send(net, withHeader, headerIncluded: true);
        Assert.Equal(before + 1, net.TxFrames);
    }

    private void Send(VirtioNet net, byte[] frameWithHeader, bool headerIncluded)
    {
        Assert.True(headerIncluded);
        _memory.Write(new GuestAddress(TxData), frameWithHeader);
        _tx!.AddChain((TxData, 12, false), (TxData + 12, (uint)frameWithHeader.Length - 12, false));
        net.ProcessTx();
        Assert.Equal(0, net.TxErrors);
    }

    /// <summary>Runs the receive path until a frame matches (answering ARP for the guest's
    /// address meanwhile); returns it without (or with) its vnet header.</summary>
    private byte[] Pump(VirtioNet net, Func<byte[], bool> match, bool withHeader = false)
    {
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < TimeSpan.FromSeconds(10))
        {
            net.ProcessRx();
            while (_seenUsed != _rx!.UsedIdx)
            {
                (uint id, uint len) = _rx.Used(_seenUsed++);
                Assert.InRange(len, 12u + 14u, (uint)RxBufferSize);
                var data = new byte[len];
                _memory.Read(new GuestAddress(RxData + 0x1000UL * id), data);
                Assert.Equal(1, BinaryPrimitives.ReadUInt16LittleEndian(data.AsSpan(10))); // num_buffers
                PostRx((ushort)id);
                byte[] frame = data[12..];
                if (EtherType(frame) == 0x0806 && BinaryPrimitives.ReadUInt16BigEndian(frame.AsSpan(20)) == 1
                    && frame.AsSpan(38, 4).SequenceEqual(s_guestIp))
                {
                    Send(net, ArpFrame(op: 2, targetMac: frame[22..28], targetIp: frame[28..32], destination: frame[22..28]));
                    continue;
                }
                if (match(frame))
                    return withHeader ? data : frame;
            }
            Thread.Sleep(10);
        }
        Assert.Fail("no matching frame from the host within 10 s");
        return [];
    }

    private static int EtherType(byte[] frame) => frame.Length >= 14 ? BinaryPrimitives.ReadUInt16BigEndian(frame.AsSpan(12)) : -1;

    private static byte[] Ethernet(byte[] destination, int type, int payloadLength, out Span<byte> payload)
    {
        var f = new byte[14 + payloadLength];
        destination.CopyTo(f, 0);
        s_guestMac.CopyTo(f, 6);
        BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(12), (ushort)type);
        payload = f.AsSpan(14);
        return f;
    }

    private static byte[] ArpFrame(ushort op, byte[] targetMac, byte[] targetIp, byte[] destination)
    {
        byte[] f = Ethernet(destination, 0x0806, 28, out Span<byte> a);
        BinaryPrimitives.WriteUInt16BigEndian(a, 1);           // Ethernet
        BinaryPrimitives.WriteUInt16BigEndian(a[2..], 0x0800); // IPv4
        a[4] = 6;
        a[5] = 4;
        BinaryPrimitives.WriteUInt16BigEndian(a[6..], op);
        s_guestMac.CopyTo(a[8..]);
        s_guestIp.CopyTo(a[14..]);
        targetMac.CopyTo(a[18..]);
        targetIp.CopyTo(a[24..]);
        return f;
    }

    private static void Ipv4Header(Span<byte> ip, int totalLength, byte protocol)
    {
        ip[0] = 0x45;
        BinaryPrimitives.WriteUInt16BigEndian(ip[2..], (ushort)totalLength);
        BinaryPrimitives.WriteUInt16BigEndian(ip[4..], 0x1234);
        ip[8] = 64;
        ip[9] = protocol;
        s_guestIp.CopyTo(ip[12..]);
        s_hostIp.CopyTo(ip[16..]);
        BinaryPrimitives.WriteUInt16BigEndian(ip[10..], Checksum(ip[..20], 0));
    }

    private static byte[] IcmpEcho(byte[] hostMac, ushort id, ushort seq, byte[] payload)
    {
        int length = 20 + 8 + payload.Length;
        byte[] f = Ethernet(hostMac, 0x0800, length, out Span<byte> ip);
        Ipv4Header(ip, length, 1);
        Span<byte> icmp = ip[20..];
        icmp[0] = 8; // echo request
        BinaryPrimitives.WriteUInt16BigEndian(icmp[4..], id);
        BinaryPrimitives.WriteUInt16BigEndian(icmp[6..], seq);
        payload.CopyTo(icmp[8..]);
        BinaryPrimitives.WriteUInt16BigEndian(icmp[2..], Checksum(icmp, 0));
        return f;
    }

    /// <summary>A UDP datagram whose checksum the "hardware" is to finish: vnet header with
    /// NEEDS_CSUM, csum_start at the UDP header, csum_offset 6, and the field holding the
    /// pseudo-header sum (virtio 1.2 §5.1.6.2).</summary>
    private static byte[] UdpPartialChecksum(byte[] hostMac, ushort sourcePort, ushort port, byte[] payload)
    {
        int udpLength = 8 + payload.Length;
        byte[] f = Ethernet(hostMac, 0x0800, 20 + udpLength, out Span<byte> ip);
        Ipv4Header(ip, 20 + udpLength, 17);
        Span<byte> udp = ip[20..];
        BinaryPrimitives.WriteUInt16BigEndian(udp, sourcePort);
        BinaryPrimitives.WriteUInt16BigEndian(udp[2..], port);
        BinaryPrimitives.WriteUInt16BigEndian(udp[4..], (ushort)udpLength);
        payload.CopyTo(udp[8..]);
        uint pseudo = Sum(s_guestIp, 0) + Sum(s_hostIp, 0) + 17 + (uint)udpLength;
        BinaryPrimitives.WriteUInt16BigEndian(udp[6..], (ushort)~Checksum([], pseudo)); // folded, not complemented

        var withHeader = new byte[12 + f.Length];
        withHeader[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        BinaryPrimitives.WriteUInt16LittleEndian(withHeader.AsSpan(6), 14 + 20); // csum_start
        BinaryPrimitives.WriteUInt16LittleEndian(withHeader.AsSpan(8), 6);       // csum_offset
        f.CopyTo(withHeader, 12);
        return withHeader;
    }

    private static uint Sum(ReadOnlySpan<byte> data, uint sum)
    {
        for (int i = 0; i + 1 < data.Length; i += 2)
            sum += BinaryPrimitives.ReadUInt16BigEndian(data[i..]);
        if (data.Length % 2 == 1)
            sum += (uint)data[^1] << 8;
        return sum;
    }

    /// <summary>RFC 1071 Internet checksum.</summary>
    private static ushort Checksum(ReadOnlySpan<byte> data, uint initial)
    {
        uint sum = Sum(data, initial);
        while (sum >> 16 != 0)
            sum = (sum & 0xffff) + (sum >> 16);
        return (ushort)~sum;
    }
}
