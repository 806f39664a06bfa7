using KvmSharp.Devices;
using KvmSharp.Devices.Pci;
using KvmSharp.Vmm.Interrupts;

namespace KvmSharp.Vmm.Tests;

/// <summary>An interrupt controller that records the lines handed out, with their GSIs.</summary>
internal sealed class FakeInterrupts : IInterruptController, IMsiSink
{
    public List<EdgeLine> Edges { get; } = [];
    public List<LevelLine> Levels { get; } = [];
    public List<(ulong Address, uint Data)> Messages { get; } = [];

    public IMsiSink Msi => this;

    public IInterruptLine CreateEdgeLine(uint gsi)
    {
        var l = new EdgeLine(gsi);
        Edges.Add(l);
        return l;
    }

    public ILevelInterruptLine CreateLevelLine(uint gsi)
    {
        var l = new LevelLine(gsi);
        Levels.Add(l);
        return l;
    }

    public void Deliver(ulong address, uint data) => Messages.Add((address, data));

    internal sealed class EdgeLine(uint gsi) : IInterruptLine
    {
        public uint Gsi => gsi;
        public int Count;
        public void Trigger() => Interlocked.Increment(ref Count);
    }

    internal sealed class LevelLine(uint gsi) : ILevelInterruptLine
    {
        public uint Gsi => gsi;
        public bool Level;
        public void SetLevel(bool asserted) => Level = asserted;
    }
}
