namespace KvmSharp.Devices.Virtio;

/// <summary>What <see cref="VirtioNet.ProcessRx"/> stopped on: tells the VMM when to call again.</summary>
public enum NetRxStatus
{
    /// <summary>The back end has no frame queued: call again when its fd becomes readable.</summary>
    BackendEmpty,

    /// <summary>A frame is waiting and the guest has posted no receive buffer: call again on the
    /// receive queue's notification (<see cref="IVirtioDevice.QueueNotify"/> does it). With a level-triggered fd, stop polling the back end until then.</summary>
    WaitingForBuffers,

    /// <summary>The per-call frame budget ran out with work left: call again soon (after other
    /// ready events), since an edge-triggered fd will not report it again.</summary>
    MoreWork,

    /// <summary>The device is not running (not activated, reset, or broken by the driver).</summary>
    NotRunning,
}
