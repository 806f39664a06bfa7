using KvmSharp.Devices;
using KvmSharp.Devices.Pci;
using KvmSharp.Interop;
using KvmSharp.Kvm;
using KvmSharp.Kvm.Native;

namespace KvmSharp.Vmm.Pci;

/// <summary>
/// Delivers MSI-X messages through KVM GSI routes and irqfds (api.rst §4.52 KVM_SET_GSI_ROUTING,
/// §4.75 KVM_IRQFD): each distinct (address, data) the guest programs gets an MSI route on its own
/// GSI and an eventfd bound to it, so a device interrupt is one eventfd write from whichever thread
/// completes the request, and the kernel injects it without a VM-wide ioctl.
/// </summary>
/// <remarks>
/// <para>Routes are made lazily, on the first delivery of a message (Linux writes a vector's
/// address and data while it is masked, then unmasks it, so the first delivery is the first time
/// the message is final). A guest that keeps reprogramming vectors (IRQ affinity changes) leaves
/// stale routes behind; when <see cref="MaxMsiRoutes"/> is reached the table starts over.</para>
/// <para>If the host refuses routing or irqfds, delivery falls back to KVM_SIGNAL_MSI for the
/// life of the VM; only speed is lost.</para>
/// </remarks>
internal sealed class KvmMsiRoutes : IMsiSink, IDisposable
{
    /// <summary>GSIs 0–23 are the PIC and IOAPIC pins; MSI routes follow.</summary>
    private const uint FirstMsiGsi = 24;

    /// <summary>Well below KVM_MAX_IRQ_ROUTES (4096 on x86); a guest with 64 vCPUs and a few
    /// multi-queue devices uses a few hundred vectors.</summary>
    internal const int MaxMsiRoutes = 1024;

    private readonly KvmVm _vm;
    private readonly TextWriter _log;
    private readonly Lock _lock = new();
    private readonly Dictionary<(ulong Address, uint Data), (FileDescriptor Fd, uint Gsi)> _irqfds = [];
    private readonly kvm_irq_routing_entry[] _table;
    private readonly int _baseCount;
    private int _count;
    private bool _fallback;
    private bool _disposed;

    public KvmMsiRoutes(KvmVm vm, TextWriter log)
    {
        _vm = vm;
        _log = log;
        var irqchip = IrqchipRoutes();
        _baseCount = irqchip.Length;
        _table = new kvm_irq_routing_entry[_baseCount + MaxMsiRoutes];
        irqchip.CopyTo(_table, 0);
        _count = _baseCount;
    }

    /// <summary>Messages that currently have a route (for tests and diagnostics).</summary>
    internal int RouteCount
    {
        get { lock (_lock) return _count - _baseCount; }
    }

    /// <summary>Whether delivery fell back to KVM_SIGNAL_MSI.</summary>
    internal bool UsesSignalMsi
    {
        get { lock (_lock) return _fallback; }
    }

    public void Deliver(ulong address, uint data)
    {
        lock (_lock)
        {
            if (_disposed)
                return;
            if (!_fallback)
            {
                var fd = _irqfds.TryGetValue((address, data), out var route) ? route.Fd : AddRouteLocked(address, data);
                if (fd is not null)
                {
                    Libc.EventFdWrite(fd.Fd);
                    return;
                }
            }
        }
        _vm.SignalMsi(address, data);
    }

    private FileDescriptor? AddRouteLocked(ulong address, uint data)
    {
        if (_count == _table.Length)
            ResetLocked();
        uint gsi = FirstMsiGsi + (uint)(_count - _baseCount);
        _table[_count] = new kvm_irq_routing_entry
        {
            gsi = gsi,
            type = KvmConstants.KVM_IRQ_ROUTING_MSI,
            msi_address_lo = (uint)address,
            msi_address_hi = (uint)(address >> 32),
            msi_data = data,
        };
        FileDescriptor? fd = null;
        try
        {
            _vm.SetGsiRouting(_table.AsSpan(0, _count + 1));
            fd = Libc.EventFd();
            _vm.RegisterIrqfd(fd.Fd, gsi);
        }
        catch (NativeException e)
        {
            fd?.Dispose();
            _fallback = true;
            _log.WriteLine($"kvmsharp: no MSI route/irqfd ({e.Message}); interrupts use KVM_SIGNAL_MSI");
            return null;
        }
        _count++;
        _irqfds[(address, data)] = (fd, gsi);
        return fd;
    }

    /// <summary>Drops every MSI route and its irqfd; the next deliveries make new ones.</summary>
    private void ResetLocked()
    {
        foreach (var (fd, gsi) in _irqfds.Values)
        {
            try
            {
                _vm.UnregisterIrqfd(fd.Fd, gsi);
            }
            catch (KvmException)
            {
                // Nothing more to undo: closing the eventfd below releases it.
            }
            fd.Dispose();
        }
        _irqfds.Clear();
        _count = _baseCount;
    }

    /// <summary>
    /// KVM's default table for the in-kernel irqchip (virt/kvm/irqchip.c, arch/x86/kvm/irq_comm.c):
    /// GSIs 0–15 on both the PICs and IOAPIC pins 0–15, GSIs 16–23 on IOAPIC pins 16–23. Setting
    /// a routing table replaces the default one, so it has to be repeated.
    /// </summary>
    private static kvm_irq_routing_entry[] IrqchipRoutes()
    {
        var routes = new List<kvm_irq_routing_entry>();
        for (uint gsi = 0; gsi < FirstMsiGsi; gsi++)
        {
            routes.Add(new kvm_irq_routing_entry { gsi = gsi, type = KvmConstants.KVM_IRQ_ROUTING_IRQCHIP, irqchip_irqchip = KvmConstants.KVM_IRQCHIP_IOAPIC, irqchip_pin = gsi });
            if (gsi < 16)
            {
                uint chip = gsi < 8 ? KvmConstants.KVM_IRQCHIP_PIC_MASTER : KvmConstants.KVM_IRQCHIP_PIC_SLAVE;
                routes.Add(new kvm_irq_routing_entry { gsi = gsi, type = KvmConstants.KVM_IRQ_ROUTING_IRQCHIP, irqchip_irqchip = chip, irqchip_pin = gsi % 8 });
            }
        }
        return [.. routes];
    }

    public void Dispose()
    {
        lock (_lock)
        {
            foreach (var (fd, _) in _irqfds.Values)
                fd.Dispose();
            _irqfds.Clear();
            _disposed = true;
        }
    }
}
