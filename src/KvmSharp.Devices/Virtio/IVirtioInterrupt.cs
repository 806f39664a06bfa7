namespace KvmSharp.Devices.Virtio;

/// <summary>
/// The interrupt path from a device to its driver, supplied by the transport: an INTx-style line
/// with an interrupt status register (virtio-mmio) or per-queue MSI-X vectors (virtio-pci).
/// Thread-safe; called from the device's worker thread.
/// </summary>
/// <remarks>Takes no lock that a transport holds while calling into its device, so a device may
/// signal while holding its own lock.</remarks>
public interface IVirtioInterrupt
{
    /// <summary>Interrupts the driver. <paramref name="queueIndex"/> is ignored for
    /// <see cref="VirtioInterruptType.Config"/>.</summary>
    void Signal(VirtioInterruptType type, int queueIndex);
}
