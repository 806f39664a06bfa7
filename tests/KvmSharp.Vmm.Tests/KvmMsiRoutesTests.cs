using KvmSharp.Interop;
using KvmSharp.Kvm;
using KvmSharp.Kvm.Native;
using KvmSharp.Vmm.Interrupts;
using Xunit;

namespace KvmSharp.Vmm.Tests;

/// <summary>A fake of the KVM interrupt ioctls: records the routing table and irqfds, or refuses them.</summary>
internal sealed class FakeIrqRouting : IIrqRouting
{
    public bool Refuse;
    public kvm_irq_routing_entry[] Table = [];
    public int RoutingCalls;
    public readonly Dictionary<uint, int> Irqfds = [];
    public readonly List<(uint Gsi, int Fd, int Resample)> Resampled = [];
    public readonly List<(ulong Address, uint Data)> Signalled = [];
    public readonly List<(uint Gsi, bool Level)> Lines = [];

    public void SetGsiRouting(ReadOnlySpan<kvm_irq_routing_entry> entries)
    {
        if (Refuse)
            throw new KvmException("KVM_SET_GSI_ROUTING", 22); // EINVAL
        Table = entries.ToArray();
        RoutingCalls++;
    }

    public void RegisterIrqfd(int eventFd, uint gsi)
    {
        if (Refuse)
            throw new KvmException("KVM_IRQFD", 22); // EINVAL
        Irqfds[gsi] = eventFd;
    }

    public void RegisterIrqfdWithResample(int eventFd, uint gsi, int resampleFd)
    {
        if (Refuse)
            throw new KvmException("KVM_IRQFD(resample)", 22); // EINVAL
        Resampled.Add((gsi, eventFd, resampleFd));
    }

    public void UnregisterIrqfd(int eventFd, uint gsi) => Irqfds.Remove(gsi);

    public void SetIrqLine(uint gsi, bool level)
    {
        if (Refuse)
            throw new KvmException("KVM_IRQ_LINE", 22); // EINVAL
        Lines.Add((gsi, level));
    }

    public bool SignalMsi(ulong address, uint data)
    {
        Signalled.Add((address, data));
        return true;
    }
}

public sealed class KvmMsiRoutesTests
{
    private static kvm_irq_routing_entry Route(FakeIrqRouting k, uint gsi) => Assert.Single(k.Table, e => e.gsi == gsi && e.type == KvmConstants.KVM_IRQ_ROUTING_MSI);

    [Fact]
    public void EachVectorGetsItsOwnGsiRouteAndIrqfdWhenProgrammed()
    {
        var k = new FakeIrqRouting();
        using var routes = new KvmMsiRoutes(k, TextWriter.Null);
        var v0 = (MsiRouteVector)routes.CreateVector()!;
        var v1 = (MsiRouteVector)routes.CreateVector()!;
        Assert.NotEqual(v0.Gsi, v1.Gsi);
        Assert.Equal(0, routes.RouteCount); // nothing until programmed
        Assert.Empty(k.Irqfds);

        v0.Program(0xFEE0_0000, 0x41);
        v1.Program(0xFEE0_1000, 0x42);
        Assert.Equal(2, routes.RouteCount);
        Assert.Equal(0x41u, Route(k, v0.Gsi).msi_data);
        Assert.Equal(0xFEE0_1000u, Route(k, v1.Gsi).msi_address_lo);
        Assert.Equal(v0.EventFd, k.Irqfds[v0.Gsi]);
        // The irqchip pins stay routed: GSIs 0–23 on the IOAPIC (and 0–15 on the PICs).
        Assert.Equal(24 + 16 + 2, k.Table.Length);

        v0.Trigger();
        v0.Trigger();
        Assert.Equal(2UL, Libc.EventFdRead(v0.EventFd!.Value));
        Assert.Empty(k.Signalled);
    }

    [Fact]
    public void ReprogrammingRewritesTheSameRouteAndKeepsTheIrqfd()
    {
        var k = new FakeIrqRouting();
        using var routes = new KvmMsiRoutes(k, TextWriter.Null);
        var v = (MsiRouteVector)routes.CreateVector()!;
        v.Program(0xFEE0_0000, 0x41);
        int fd = v.EventFd!.Value;
        v.Program(0xFEE0_2000, 0x51); // IRQ affinity moved
        Assert.Equal(1, routes.RouteCount);
        Assert.Equal(0x51u, Route(k, v.Gsi).msi_data);
        Assert.Equal(fd, v.EventFd);
    }

    [Fact]
    public void VectorsAreCappedAndTheRestUseDeliver()
    {
        var k = new FakeIrqRouting();
        using var routes = new KvmMsiRoutes(k, TextWriter.Null);
        for (int i = 0; i < KvmMsiRoutes.MaxMsiRoutes; i++)
            Assert.NotNull(routes.CreateVector());
        Assert.Null(routes.CreateVector());
        routes.Deliver(0xFEE0_0000, 0x41);
        Assert.Equal((0xFEE0_0000UL, 0x41u), Assert.Single(k.Signalled));
    }

    [Fact]
    public void RefusedRoutesFallBackToSignalMsiWithoutThrowing()
    {
        var k = new FakeIrqRouting { Refuse = true };
        var log = new StringWriter();
        using var routes = new KvmMsiRoutes(k, log);
        var v = routes.CreateVector()!;
        v.Program(0xFEE0_0000, 0x41);
        v.Trigger();
        Assert.True(routes.UsesSignalMsi);
        Assert.Contains("KVM_SIGNAL_MSI", log.ToString(), StringComparison.Ordinal);
        Assert.Equal((0xFEE0_0000UL, 0x41u), Assert.Single(k.Signalled));
    }

    [Fact]
    public void LevelLinesUseAResamplingIrqfdOrFallBackToIrqLine()
    {
        var k = new FakeIrqRouting();
        using var loop = new EventLoop();
        using (var c = new KvmInterruptController(k, () => loop, TextWriter.Null))
        {
            var line = Assert.IsType<ResampledLevelLine>(c.CreateLevelLine(17));
            Assert.Equal((17u, line.IrqFd, line.ResampleFd), Assert.Single(k.Resampled));
            line.SetLevel(true);
            Assert.Equal(1UL, Libc.EventFdRead(line.IrqFd));
            // The guest EOId while the level is still high: the I/O thread re-asserts.
            Libc.EventFdWrite(line.ResampleFd);
            line.Process(Libc.EPOLLIN);
            Assert.Equal(1UL, Libc.EventFdRead(line.IrqFd));
            // Deasserted: an EOI does not re-assert.
            line.SetLevel(false);
            Libc.EventFdWrite(line.ResampleFd);
            line.Process(Libc.EPOLLIN);
            Assert.Equal(0UL, Libc.EventFdRead(line.IrqFd));
        }

        var refusing = new FakeIrqRouting { Refuse = true };
        var log = new StringWriter();
        using var c2 = new KvmInterruptController(refusing, () => loop, log);
        var fallback = c2.CreateLevelLine(18);
        Assert.IsType<KvmLevelLine>(fallback);
        fallback.SetLevel(true); // KVM_IRQ_LINE refused too: logged, not thrown
        Assert.Contains("KVM_IRQ_LINE", log.ToString(), StringComparison.Ordinal);
    }
}
