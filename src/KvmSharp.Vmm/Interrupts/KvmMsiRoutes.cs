using KvmSharp.Devices.Pci;
using KvmSharp.Interop;
using KvmSharp.Kvm;
using KvmSharp.Kvm.Native;

namespace KvmSharp.Vmm.Interrupts;

/// <summary>
/// MSI-X vectors as KVM GSI routes plus irqfds (api.rst §4.52 KVM_SET_GSI_ROUTING, §4.75
/// KVM_IRQFD): every MSI-X table entry gets a vector of its own (<see cref="CreateVector"/>) with a
/// fixed GSI. When the guest unmasks the entry or reprograms an unmasked one, the table calls
/// <see cref="IMsiVector.Program"/> on the vCPU thread, which rewrites that GSI's route (and, the
/// first time, binds an eventfd to it). Raising the vector is then one eventfd write from whichever
/// thread completes the request: no lock, no look-up, no VM-wide ioctl (CH vmm/src/interrupt.rs).
/// </summary>
/// <remarks>
/// <para>GSIs are handed out once per table entry for the life of the VM, so stale routes cannot
/// pile up; <see cref="MaxMsiRoutes"/> caps them, and entries beyond the cap use
/// <see cref="Deliver"/>. If the host refuses routing or irqfds, every vector falls back to
/// KVM_SIGNAL_MSI for the life of the VM; only speed is lost.</para>
/// <para>Lock: <c>_lock</c> guards the routing table; it is taken by Program (under an MSI-X table's
/// lock: table, then this) and never on the trigger path.</para>
/// </remarks>
internal sealed class KvmMsiRoutes : IMsiSink, IDisposable
{
    /// <summary>GSIs 0–23 are the PIC and IOAPIC pins; MSI routes follow.</summary>
    internal const uint FirstMsiGsi = 24;

    /// <summary>Well below KVM_MAX_IRQ_ROUTES (4096 on x86); a guest with 64 vCPUs and a few
    /// multi-queue devices uses a few hundred vectors.</summary>
    internal const int MaxMsiRoutes = 1024;

    private readonly IIrqRouting _vm;
    private readonly TextWriter _log;
    private readonly Lock _lock = new();
    private readonly kvm_irq_routing_entry[] _table;
    // Index in _table of each vector's route (by GSI − FirstMsiGsi), −1 until first programmed.
    private readonly int[] _routeIndex = new int[MaxMsiRoutes];
    private readonly List<MsiRouteVector> _vectors = [];
    private int _count;
    private volatile bool _fallback;
    private bool _disposed;

    public KvmMsiRoutes(KvmVm vm, TextWriter log)
        : this(new KvmIrqRouting(vm), log)
    {
    }

    public KvmMsiRoutes(IIrqRouting vm, TextWriter log)
    {
        _vm = vm;
        _log = log;
        var irqchip = IrqchipRoutes();
        _table = new kvm_irq_routing_entry[irqchip.Length + MaxMsiRoutes];
        irqchip.CopyTo(_table, 0);
        _count = irqchip.Length;
        Array.Fill(_routeIndex, -1);
    }

    /// <summary>Vectors that have a route (were programmed at least once), for tests and diagnostics.</summary>
    internal int RouteCount
    {
        get
        {
            lock (_lock)
                return _count - (_table.Length - MaxMsiRoutes);
        }
    }

    /// <summary>Whether delivery fell back to KVM_SIGNAL_MSI.</summary>
    internal bool UsesSignalMsi => _fallback;

    internal IIrqRouting Routing => _vm;

    /// <summary>The slow path: one KVM_SIGNAL_MSI (vectors past the cap, or after a refusal).</summary>
    public void Deliver(ulong address, uint data) => _vm.SignalMsi(address, data);

    /// <summary>A vector with its own GSI, or null once <see cref="MaxMsiRoutes"/> are handed out.</summary>
    public IMsiVector? CreateVector()
    {
        lock (_lock)
        {
            if (_disposed || _vectors.Count == MaxMsiRoutes)
                return null;
            var v = new MsiRouteVector(this, FirstMsiGsi + (uint)_vectors.Count);
            _vectors.Add(v);
            return v;
        }
    }

    /// <summary>
    /// Points <paramref name="gsi"/>'s route at (address, data) and, the first time, binds an
    /// eventfd to it. Returns the eventfd, or null when the host refused (delivery then falls back
    /// to KVM_SIGNAL_MSI for every vector).
    /// </summary>
    internal FileDescriptor? Program(uint gsi, FileDescriptor? fd, ulong address, uint data)
    {
        lock (_lock)
        {
            if (_disposed || _fallback)
                return null;
            int slot = (int)(gsi - FirstMsiGsi);
            int index = _routeIndex[slot];
            bool added = index < 0;
            if (added)
                index = _count;
            _table[index] = new kvm_irq_routing_entry
            {
                gsi = gsi,
                type = KvmConstants.KVM_IRQ_ROUTING_MSI,
                msi_address_lo = (uint)address,
                msi_address_hi = (uint)(address >> 32),
                msi_data = data,
            };
            FileDescriptor? created = null;
            try
            {
                _vm.SetGsiRouting(_table.AsSpan(0, added ? _count + 1 : _count));
                if (fd is null)
                {
                    created = Libc.EventFd();
                    _vm.RegisterIrqfd(created.Fd, gsi);
                    fd = created;
                }
            }
            catch (NativeException e)
            {
                created?.Dispose();
                _fallback = true;
                _log.WriteLine($"kvmsharp: no MSI route/irqfd ({e.Message}); interrupts use KVM_SIGNAL_MSI");
                return null;
            }
            if (added)
            {
                _routeIndex[slot] = index;
                _count++;
            }
            return fd;
        }
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
            foreach (var v in _vectors)
                v.Dispose();
            _disposed = true;
        }
    }
}
