using System.Buffers.Binary;
using KvmSharp.Interop;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

// The receive path (virtio 1.2 §5.1.6.3-4): back-end frames into receiveq chains, one chain per
// frame or, with MRG_RXBUF, as many as it takes (num_buffers); under _rxLock.
public sealed partial class VirtioNet
{
    /// <summary>
    /// Moves frames from the back end into the guest's receive buffers until the back end is
    /// empty, the guest has no buffers left (the frame in hand is kept for later), or
    /// <see cref="RxBudget"/> frames were handled; then signals the driver if it wants it.
    /// </summary>
    /// <remarks>Call when the back end's fd becomes readable, on the receive queue's notification
    /// (its ioeventfd, or through <see cref="QueueNotify"/>), and again when the result says so.</remarks>
    /// <returns>Why it stopped, and so when to call again.</returns>
    public NetRxStatus ProcessRx()
    {
        lock (_rxLock)
        {
            if (!_core.TryGetQueue(RxQueueIndex, out VirtQueue? queue, out GuestMemory? memory, out IVirtioInterrupt? interrupt))
                return NetRxStatus.NotRunning;
            bool used = false;
            int budget = RxBudget;
            NetRxStatus status;
            while (true)
            {
                if (_rxLength == 0)
                {
                    if (budget == 0)
                    {
                        status = NetRxStatus.MoreWork;
                        break;
                    }
                    if (!ReadFrame())
                    {
                        status = NetRxStatus.BackendEmpty;
                        break;
                    }
                    budget--;
                    if (_rxLength == 0)
                        continue; // dropped
                }
                DeliverResult delivered = _mergeable ? DeliverMergeable(queue, memory, ref used) : DeliverSingle(queue, memory, ref used);
                if (delivered == DeliverResult.Done)
                    continue;
                if (delivered == DeliverResult.Broken)
                {
                    status = NetRxStatus.NotRunning;
                    break;
                }
                // Out of buffers: ask for a kick, and look again for buffers that raced with the
                // request (§2.7.10), or the guest may never kick.
                if (!queue.EnableNotification(memory))
                {
                    status = NetRxStatus.WaitingForBuffers;
                    break;
                }
            }
            // Kicks are only needed while a frame waits for buffers (EnableNotification above);
            // otherwise spare the guest the exits (VIRTQ_USED_F_NO_NOTIFY; a no-op with EVENT_IDX).
            if (status is NetRxStatus.BackendEmpty or NetRxStatus.MoreWork)
                queue.DisableNotification(memory);
            if (used && !Broken && queue.NeedsNotification(memory))
                interrupt.Signal(VirtioInterruptType.Queue, RxQueueIndex);
            return status;
        }
    }

    private enum DeliverResult
    {
        Done,
        NoBuffers,
        Broken,
    }

    /// <summary>Reads the next frame into _rxBuffer; false when the back end has none.
    /// Leaves _rxLength 0 when the frame read was dropped.</summary>
    private bool ReadFrame()
    {
        int n = _backend.Read(_rxBuffer);
        if (n <= 0)
        {
            if (n < 0 && n != -Libc.EAGAIN)
                _core.Log?.Write("virtio-net: back end read failed: errno ", (ulong)-n);
            return false;
        }
        if (n > _rxBuffer.Length || n < HeaderSize + MinFrameSize)
        {
            Interlocked.Increment(ref _rxDropped);
            _core.Log?.Write("virtio-net: dropped a received frame of bad length ", (ulong)n);
            return true;
        }
        _rxLength = n;
        _rxOffset = 0;
        return true;
    }

    /// <summary>Without MRG_RXBUF: the whole frame goes into one chain (§5.1.6.3.1), num_buffers 1.</summary>
    private DeliverResult DeliverSingle(VirtQueue queue, GuestMemory memory, ref bool used)
    {
        DescriptorChain chain = _rxChain;
        while (!_rxChainHeld)
        {
            PopResult result = queue.TryPop(memory, chain);
            if (result == PopResult.Empty)
                return DeliverResult.NoBuffers;
            if (result == PopResult.BrokenRing)
            {
                _core.MarkBroken(_core.Interrupt, RxQueueIndex);
                return DeliverResult.Broken;
            }
            if (result == PopResult.Chain && chain.WritableLength >= HeaderSize)
            {
                _rxChainHeld = true;
                break;
            }
            _core.BadChain(chain.Head, result == PopResult.Chain ? "receive chain has no room for the header" : "receive chain is malformed or outside RAM");
            if (!AddUsed(queue, memory, chain.Head, 0, ref used))
                return DeliverResult.Broken;
        }

        if ((uint)_rxLength > chain.WritableLength)
        {
            // The guest posted buffers too small for this frame (it did not negotiate the GSO it
            // would need, or shrank its buffers): drop the frame, keep the chain for the next.
            Interlocked.Increment(ref _rxDropped);
            _core.Log?.Write("virtio-net: received frame larger than the guest's buffer, dropped: ", (ulong)_rxLength);
            _rxLength = 0;
            return DeliverResult.Done;
        }
        BinaryPrimitives.WriteUInt16LittleEndian(_rxBuffer.AsSpan(NumBuffersOffset), 1); // §5.1.6.4
        var writer = new ChainWriter(memory, chain);
        int written = writer.Write(_rxBuffer.AsSpan(0, _rxLength));
        _rxChainHeld = false;
        if (written != _rxLength)
        {
            // RAM disappeared under a checked chain: return what was written, count the frame lost.
            Interlocked.Increment(ref _rxDropped);
            _rxLength = 0;
            return AddUsed(queue, memory, chain.Head, 0, ref used) ? DeliverResult.Done : DeliverResult.Broken;
        }
        CountDelivered();
        _rxLength = 0;
        return AddUsed(queue, memory, chain.Head, (uint)written, ref used) ? DeliverResult.Done : DeliverResult.Broken;
    }

    /// <summary>
    /// With MRG_RXBUF: the frame fills as many chains as it needs (§5.1.6.4.1). Filled chains are
    /// remembered and returned together once the frame is complete and num_buffers written, so
    /// the driver never sees a first buffer whose companions are missing; a frame that runs out
    /// of buffers resumes where it stopped.
    /// </summary>
    private DeliverResult DeliverMergeable(VirtQueue queue, GuestMemory memory, ref bool used)
    {
        DescriptorChain chain = _rxChain;
        while (_rxOffset < _rxLength)
        {
            if (_rxUsedCount + _rxDeferredBadCount >= queue.Size)
            {
                // Every descriptor the driver can give us is held and the frame still does not
                // fit (tiny buffers): it never will. Give the buffers back empty, drop the frame.
                Interlocked.Increment(ref _rxDropped);
                _core.Log?.Write("virtio-net: received frame larger than the whole receive ring, dropped: ", (ulong)_rxLength);
                for (int i = 0; i < _rxUsedCount; i++)
                    _rxUsed[i].Length = 0;
                _rxLength = 0;
                return FlushUsed(queue, memory, ref used) ? DeliverResult.Done : DeliverResult.Broken;
            }
            PopResult result = queue.TryPop(memory, chain);
            if (result == PopResult.Empty)
                return DeliverResult.NoBuffers;
            if (result == PopResult.BrokenRing)
            {
                _core.MarkBroken(_core.Interrupt, RxQueueIndex);
                return DeliverResult.Broken;
            }
            bool first = _rxUsedCount == 0;
            if (result != PopResult.Chain || chain.WritableLength < (first ? HeaderSize : 1) || (first && !FindNumBuffers(chain)))
            {
                _core.BadChain(chain.Head, result == PopResult.Chain ? "receive chain has no room for the header" : "receive chain is malformed or outside RAM");
                if (first)
                {
                    if (!AddUsed(queue, memory, chain.Head, 0, ref used))
                        return DeliverResult.Broken;
                }
                else
                {
                    // Not among this frame's used entries: the driver reads a frame's
                    // num_buffers entries in a row. Returned after the frame.
                    _rxDeferredBad[_rxDeferredBadCount++] = chain.Head;
                }
                continue;
            }
            var writer = new ChainWriter(memory, chain);
            int chunk = (int)Math.Min((uint)(_rxLength - _rxOffset), chain.WritableLength);
            int written = writer.Write(_rxBuffer.AsSpan(_rxOffset, chunk));
            _rxUsed[_rxUsedCount++] = (chain.Head, (uint)written);
            if (written != chunk)
            {
                // RAM disappeared under a checked chain: the frame is lost.
                Interlocked.Increment(ref _rxDropped);
                for (int i = 0; i < _rxUsedCount; i++)
                    _rxUsed[i].Length = 0;
                _rxLength = 0;
                return FlushUsed(queue, memory, ref used) ? DeliverResult.Done : DeliverResult.Broken;
            }
            _rxOffset += written;
        }

        // §5.1.6.4: num_buffers in the first buffer's header, written before any used entry.
        ushort count = (ushort)_rxUsedCount;
        memory.TryWrite(_numBuffersLow, (byte)count);
        memory.TryWrite(_numBuffersHigh, (byte)(count >> 8));
        CountDelivered();
        _rxLength = 0;
        return FlushUsed(queue, memory, ref used) ? DeliverResult.Done : DeliverResult.Broken;
    }

    /// <summary>Records where bytes 10 and 11 of the writable part (num_buffers) are in guest
    /// memory: the header may straddle descriptors.</summary>
    private bool FindNumBuffers(DescriptorChain chain)
    {
        int found = 0;
        uint start = 0;
        foreach (ChainSegment s in chain.Writable)
        {
            for (uint wanted = NumBuffersOffset + (uint)found; found < 2 && wanted < start + s.Length; wanted++)
            {
                var address = new GuestAddress(s.Address.Value + (wanted - start));
                if (found++ == 0)
                    _numBuffersLow = address;
                else
                    _numBuffersHigh = address;
            }
            if (found == 2)
                return true;
            start += s.Length;
        }
        return false;
    }

    /// <summary>
    /// Returns the current frame's chains, then the bad ones met meanwhile, with one used.idx
    /// store (virtio 1.2 §2.7.8): published one by one, the driver could see the first buffer,
    /// whose num_buffers counts the rest (§5.1.6.4), before the rest are in the used ring, and
    /// Linux's receive_mergeable then drops the frame ("rx error: %d buffers out of %d missing").
    /// </summary>
    private bool FlushUsed(VirtQueue queue, GuestMemory memory, ref bool used)
    {
        bool ok = true;
        used |= _rxUsedCount + _rxDeferredBadCount != 0;
        for (int i = 0; i < _rxUsedCount && ok; i++)
            ok = queue.TryWriteUsed(memory, _rxUsed[i].Head, _rxUsed[i].Length);
        for (int i = 0; i < _rxDeferredBadCount && ok; i++)
            ok = queue.TryWriteUsed(memory, _rxDeferredBad[i], 0);
        _rxUsedCount = 0;
        _rxDeferredBadCount = 0;
        if (!ok || !queue.TryPublishUsed(memory))
        {
            _core.MarkBroken(_core.Interrupt, RxQueueIndex);
            return false;
        }
        return true;
    }

    private bool AddUsed(VirtQueue queue, GuestMemory memory, ushort head, uint length, ref bool used)
    {
        if (!queue.TryAddUsed(memory, head, length))
        {
            _core.MarkBroken(_core.Interrupt, RxQueueIndex);
            return false;
        }
        used = true;
        return true;
    }

    private void CountDelivered()
    {
        Interlocked.Increment(ref _rxFrames);
        Interlocked.Add(ref _rxBytes, _rxLength - HeaderSize);
    }
}
