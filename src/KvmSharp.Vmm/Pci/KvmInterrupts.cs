using KvmSharp.Devices;
using KvmSharp.Kvm;

namespace KvmSharp.Vmm.Pci;

/// <summary>A level-triggered IOAPIC input (PCI INTx, GSIs 16–23) driven with KVM_IRQ_LINE.</summary>
internal sealed class KvmLevelLine(KvmVm vm, uint gsi) : ILevelInterruptLine
{
    public void SetLevel(bool asserted) => vm.SetIrqLine(gsi, asserted);
}
