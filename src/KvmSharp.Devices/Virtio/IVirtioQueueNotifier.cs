namespace KvmSharp.Devices.Virtio;

/// <summary>
/// The one way into a device's queues, supplied to a transport by the VMM: one eventfd per queue,
/// the same one KVM signals when it accepted an ioeventfd on the queue's notify address. A
/// notify-register write that reaches the bus (no ioeventfd) calls <see cref="Notify"/>, so every
/// kick is served on the VMM's I/O thread and never on the vCPU that wrote it (as Firecracker's
/// and Cloud Hypervisor's queue events).
/// </summary>
public interface IVirtioQueueNotifier
{
    /// <summary>Queue <paramref name="queueIndex"/> (already range-checked by the transport) was
    /// kicked. Called on a vCPU thread; must not block.</summary>
    void Notify(int queueIndex);
}
