using KvmSharp.Kvm;
using KvmSharp.Vmm.Interrupts;
using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// MSI-X vectors as GSI routes and irqfds on the real /dev/kvm: the host accepts the routing
/// table (irqchip pins plus one MSI route per vector) and the irqfds, so delivery does not fall
/// back to KVM_SIGNAL_MSI. That the guest receives the interrupts is shown by the device boot tests.
/// </summary>
public class MsiRouteTests
{
    private static (KvmSystem Kvm, KvmVm Vm) CreateVm()
    {
        Assets.RequireKvm();
        var kvm = KvmSystem.Open();
        var vm = kvm.CreateVm();
        vm.CreateIrqchip();
        return (kvm, vm);
    }

    [Fact]
    public void EachVectorGetsOneRouteAndReprogrammingReusesIt()
    {
        var (kvm, vm) = CreateVm();
        using (kvm)
        using (vm)
        {
            var log = new StringWriter();
            using var routes = new KvmMsiRoutes(vm, log);
            var a = routes.CreateVector()!;
            var b = routes.CreateVector()!;
            var c = routes.CreateVector()!;
            for (int round = 0; round < 3; round++)
            {
                a.Program(0xFEE0_0000, 0x41);
                b.Program(0xFEE0_1000, 0x42); // another destination APIC
                c.Program(0xFEE0_0000, 0x43 + (uint)round); // reprogrammed: the same route
                a.Trigger();
                b.Trigger();
                c.Trigger();
            }
            Assert.False(routes.UsesSignalMsi, log.ToString());
            Assert.Equal(3, routes.RouteCount);
        }
    }

    [Fact]
    public void TheWholeVectorBudgetFitsTheHostsRoutingTable()
    {
        var (kvm, vm) = CreateVm();
        using (kvm)
        using (vm)
        {
            var log = new StringWriter();
            using var routes = new KvmMsiRoutes(vm, log);
            for (uint i = 0; i < KvmMsiRoutes.MaxMsiRoutes; i += 64)
            {
                var v = routes.CreateVector()!;
                v.Program(0xFEE0_0000, 0x4000 + i);
            }
            Assert.False(routes.UsesSignalMsi, log.ToString());
        }
    }

    [Fact]
    public void WithoutAnIrqchipDeliveryFallsBackToSignalMsiWithoutThrowing()
    {
        Assets.RequireKvm();
        using var kvm = KvmSystem.Open();
        using var vm = kvm.CreateVm(); // no KVM_CREATE_IRQCHIP: KVM refuses routes and irqfds
        var log = new StringWriter();
        using var routes = new KvmMsiRoutes(vm, log);
        var v = routes.CreateVector()!;
        v.Program(0xFEE0_0000, 0x41);
        v.Trigger();
        v.Trigger();
        Assert.True(routes.UsesSignalMsi);
        Assert.Contains("KVM_SIGNAL_MSI", log.ToString());
    }

    [Fact]
    public void ALevelLineGetsAResamplingIrqfd()
    {
        var (kvm, vm) = CreateVm();
        using (kvm)
        using (vm)
        {
            var log = new StringWriter();
            using var loop = new KvmSharp.Vmm.EventLoop();
            using var c = new KvmInterruptController(new KvmIrqRouting(vm), () => loop, log);
            var line = c.CreateLevelLine(17);
            Assert.IsType<ResampledLevelLine>(line);
            line.SetLevel(true);
            line.SetLevel(false);
            Assert.Equal("", log.ToString());
        }
    }
}
