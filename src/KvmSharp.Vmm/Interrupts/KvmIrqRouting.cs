using KvmSharp.Kvm;
using KvmSharp.Kvm.Native;

namespace KvmSharp.Vmm.Interrupts;

/// <summary><see cref="IIrqRouting"/> on a real VM: one call per ioctl, nothing else.</summary>
internal sealed class KvmIrqRouting(KvmVm vm) : IIrqRouting
{
    public void SetGsiRouting(ReadOnlySpan<kvm_irq_routing_entry> entries) => vm.SetGsiRouting(entries);

    public void RegisterIrqfd(int eventFd, uint gsi) => vm.RegisterIrqfd(eventFd, gsi);

    public void RegisterIrqfdWithResample(int eventFd, uint gsi, int resampleFd) => vm.RegisterIrqfdWithResample(eventFd, gsi, resampleFd);

    public void UnregisterIrqfd(int eventFd, uint gsi) => vm.UnregisterIrqfd(eventFd, gsi);

    public void SetIrqLine(uint gsi, bool level) => vm.SetIrqLine(gsi, level);

    public bool SignalMsi(ulong address, uint data) => vm.SignalMsi(address, data);
}
