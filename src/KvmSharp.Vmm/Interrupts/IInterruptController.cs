using KvmSharp.Devices;
using KvmSharp.Devices.Pci;

namespace KvmSharp.Vmm.Interrupts;

/// <summary>
/// Hands out the interrupt objects device models get (design.md: devices see an interrupt line,
/// never a KVM fd). The device manager asks it for one line per wired GSI; the implementation owns
/// the eventfds it creates. <see cref="KvmInterruptController"/> is the KVM one; tests use a recorder.
/// </summary>
internal interface IInterruptController
{
    /// <summary>An edge-triggered line on <paramref name="gsi"/> (an ISA IRQ, or a virtio-mmio slot's).</summary>
    IInterruptLine CreateEdgeLine(uint gsi);

    /// <summary>A level-triggered line on <paramref name="gsi"/> (PCI INTx, GSIs 16–23).</summary>
    ILevelInterruptLine CreateLevelLine(uint gsi);

    /// <summary>Where MSI-X tables send their messages (and get their per-vector routes from).</summary>
    IMsiSink Msi { get; }
}
