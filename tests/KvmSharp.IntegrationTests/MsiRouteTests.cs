using KvmSharp.Kvm;
using KvmSharp.Vmm.Pci;
using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// MSI-X delivery through GSI routes and irqfds on the real /dev/kvm: the host accepts the routing
/// table (irqchip pins plus MSI routes) and the irqfds, so delivery does not fall back to
/// KVM_SIGNAL_MSI. That the guest receives the interrupts is shown by the device boot tests.
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
    public void EachDistinctMessageGetsOneRouteAndRepeatsReuseIt()
    {
        var (kvm, vm) = CreateVm();
        using (kvm)
        using (vm)
        {
            var log = new StringWriter();
            using var routes = new KvmMsiRoutes(vm, log);
            for (int round = 0; round < 3; round++)
            {
                routes.Deliver(0xFEE0_0000, 0x41);
                routes.Deliver(0xFEE0_1000, 0x42); // another destination APIC
                routes.Deliver(0xFEE0_0000, 0x43);
            }
            Assert.False(routes.UsesSignalMsi, log.ToString());
            Assert.Equal(3, routes.RouteCount);
        }
    }

    [Fact]
    public void TableStartsOverWhenFull()
    {
        var (kvm, vm) = CreateVm();
        using (kvm)
        using (vm)
        {
            var log = new StringWriter();
            using var routes = new KvmMsiRoutes(vm, log);
            for (uint i = 0; i < KvmMsiRoutes.MaxMsiRoutes; i++)
                routes.Deliver(0xFEE0_0000, 0x4000 + i);
            Assert.Equal(KvmMsiRoutes.MaxMsiRoutes, routes.RouteCount);
            routes.Deliver(0xFEE0_0000, 0x41);
            Assert.False(routes.UsesSignalMsi, log.ToString());
            Assert.Equal(1, routes.RouteCount);
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
        routes.Deliver(0xFEE0_0000, 0x41);
        routes.Deliver(0xFEE0_0000, 0x41);
        Assert.True(routes.UsesSignalMsi);
        Assert.Contains("KVM_SIGNAL_MSI", log.ToString());
    }
}
