using KvmSharp.Devices.Virtio;

namespace KvmSharp.Vmm.Virtio;

/// <summary>
/// Moves frames from a TAP to a virtio-net device when the TAP becomes readable. Registered
/// edge-triggered: a frame held for lack of guest buffers is resumed by the guest's rx kick
/// (which reaches <see cref="VirtioNet.QueueNotify"/>), not by the fd; a spent
/// <see cref="VirtioNet.RxBudget"/> asks the loop for another call after the other ready events,
/// so a busy TAP cannot starve the disk and the console.
/// </summary>
internal sealed class NetPump(VirtioNet net) : IEventHandler
{
    public EventResult Process(uint events) =>
        net.ProcessRx() == NetRxStatus.MoreWork ? EventResult.MoreWork : EventResult.Done;
}
