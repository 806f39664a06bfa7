using KvmSharp.Devices;
using KvmSharp.Devices.Pci;
using KvmSharp.Kvm;

namespace KvmSharp.Vmm.Pci;

/// <summary>MSI-X messages to the in-kernel LAPICs with KVM_SIGNAL_MSI (api.rst §4.71).</summary>
internal sealed class KvmMsiSink(KvmVm vm) : IMsiSink
{
    public void Deliver(ulong address, uint data) => vm.SignalMsi(address, data);
}

/// <summary>A level-triggered IOAPIC input (PCI INTx, GSIs 16–23) driven with KVM_IRQ_LINE.</summary>
internal sealed class KvmLevelLine(KvmVm vm, uint gsi) : ILevelInterruptLine
{
    public void SetLevel(bool asserted) => vm.SetIrqLine(gsi, asserted);
}
