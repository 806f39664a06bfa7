using KvmSharp.Devices.Virtio;

namespace KvmSharp.Vmm.Pci;

/// <summary>
/// Moves frames from a TAP to a virtio-net device when the TAP becomes readable. Registered
/// edge-triggered: a frame held for lack of guest buffers is resumed by the guest's rx kick
/// (which reaches <see cref="VirtioNet.QueueNotify"/>), not by the fd, so the loop never spins.
/// </summary>
internal sealed class NetPump(VirtioNet net) : IEventHandler
{
    public void Process(int fd, uint events)
    {
        // Bounded by what the TAP holds: MoreWork means the per-call budget ran out, not the frames.
        while (net.ProcessRx() == NetRxStatus.MoreWork)
        {
        }
    }
}
