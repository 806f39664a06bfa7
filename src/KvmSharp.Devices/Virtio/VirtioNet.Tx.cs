using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

// The transmit path (virtio 1.2 §5.1.6.2): transmitq chains to the back end, under _txLock.
public sealed partial class VirtioNet
{
    /// <summary>
    /// Sends every available transmit chain to the back end, then signals the driver if it wants
    /// it. Call on the transmit queue's notification (its ioeventfd, or through
    /// <see cref="QueueNotify"/>).
    /// </summary>
    public void ProcessTx()
    {
        lock (_txLock)
        {
            _core.Serve(TxQueueIndex, _txChain, _transmit);
        }
    }

    /// <remarks>§5.1.6.2: the device writes nothing into a transmit buffer.</remarks>
    private uint Transmit(GuestMemory memory, DescriptorChain chain)
    {
        uint length = chain.ReadableLength;
        // §5.1.6.2: a transmit chain is the header and the frame, all device-readable.
        if (chain.WritableLength != 0)
        {
            _core.BadChain(chain.Head, "transmit chain has device-writable buffers");
            return 0;
        }
        if (length < HeaderSize + MinFrameSize || length > (uint)_txBuffer.Length)
        {
            _core.BadChain(chain.Head, "transmit chain length is outside [26, 65612]");
            return 0;
        }
        var reader = new ChainReader(memory, chain);
        Span<byte> frame = _txBuffer.AsSpan(0, (int)length);
        if (reader.Read(frame) != frame.Length)
        {
            _core.BadChain(chain.Head, "transmit chain could not be read");
            return 0;
        }
        // The TAP takes virtio_net_hdr_v1 as is (flags, gso_type, hdr_len, gso_size,
        // csum_start, csum_offset; num_buffers is ignored on transmit) and validates it itself.
        int n = _backend.Write(frame);
        if (n < 0)
        {
            Interlocked.Increment(ref _txErrors);
            _core.Log?.Write("virtio-net: back end write failed, frame dropped: errno ", (ulong)-n);
            return 0;
        }
        Interlocked.Increment(ref _txFrames);
        Interlocked.Add(ref _txBytes, length - HeaderSize);
        return 0;
    }
}
