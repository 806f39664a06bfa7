using KvmSharp.Devices;
using KvmSharp.Interop;

namespace KvmSharp.Vmm.Interrupts;

/// <summary>
/// A level-triggered I/O APIC input driven with KVM_IRQ_LINE: the fallback for hosts that refuse
/// irqfd resampling (<see cref="ResampledLevelLine"/>). A VM-wide ioctl per change of level; a
/// refusal is logged, never thrown into the device thread that raised the interrupt.
/// </summary>
internal sealed class KvmLevelLine(IIrqRouting vm, uint gsi, TextWriter log) : ILevelInterruptLine
{
    private int _errorLogged;

    public uint Gsi => gsi;

    public void SetLevel(bool asserted)
    {
        try
        {
            vm.SetIrqLine(gsi, asserted);
        }
        catch (NativeException e)
        {
            if (Interlocked.Exchange(ref _errorLogged, 1) == 0)
                log.WriteLine($"kvmsharp: KVM_IRQ_LINE on GSI {gsi} failed ({e.Message}); the interrupt is lost");
        }
    }
}
