using System.Buffers.Binary;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>
/// The virtio-mmio transport, version 2 ("modern"; virtio 1.2 §4.2.2, "MMIO Device Register
/// Layout"), in front of one <see cref="IVirtioDevice"/>. Insert it on the MMIO bus with length
/// <see cref="RegionSize"/> and describe it to Linux with
/// <c>virtio_mmio.device=4K@&lt;base&gt;:&lt;irq&gt;</c> (needs VIRTIO_MMIO_CMDLINE_DEVICES) or a
/// device-tree/ACPI node.
/// </summary>
/// <remarks>
/// <para>Registers are 32 bits wide and must be accessed with aligned 32-bit accesses (§4.2.2.2);
/// other accesses to the register block are ignored and read as 0. The configuration space at
/// 0x100 accepts any width.</para>
/// <para>Interrupts: one line. <see cref="IVirtioInterrupt.Signal"/> sets the matching
/// InterruptStatus bit and triggers the line (an edge per signal); the driver's interrupt handler
/// reads InterruptStatus, acknowledges it and then scans every used ring, so a signal after that
/// scan is a new edge and none is lost.</para>
/// <para>Queue notifications: the VMM should register an ioeventfd at base +
/// <see cref="QueueNotifyOffset"/> (4 bytes, data match = queue index) so kicks never exit to user
/// space; without one, a write there reaches the <see cref="IVirtioQueueNotifier"/>, which
/// signals the same queue event. Either way the device is served on the VMM's I/O thread
/// (<see cref="NotifyQueue"/>).</para>
/// <para>Threads: register accesses from vCPU threads serialise on one lock; device calls made
/// from it (config access, activate, reset) run under it. Lock order: transport lock, then
/// whatever the device takes. <see cref="IVirtioInterrupt.Signal"/> and <see cref="NotifyQueue"/> take no lock.</para>
/// </remarks>
public sealed class VirtioMmioTransport : IBusDevice, IVirtioInterrupt, IVirtioTransport
{
    /// <summary>Bytes of MMIO space the transport occupies (registers plus configuration space).</summary>
    public const ulong RegionSize = 0x1000;

    /// <summary>Offset of QueueNotify, for registering an ioeventfd.</summary>
    public const ulong QueueNotifyOffset = 0x050;

    // Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
    private const int MagicValue = 0x000;
    private const int Version = 0x004;
    private const int DeviceID = 0x008;
    private const int VendorID = 0x00c;
    private const int DeviceFeatures = 0x010;
    private const int DeviceFeaturesSel = 0x014;
    private const int DriverFeatures = 0x020;
    private const int DriverFeaturesSel = 0x024;
    private const int QueueSel = 0x030;
    private const int QueueNumMax = 0x034;
    private const int QueueNum = 0x038;
    private const int QueueReady = 0x044;
    private const int QueueNotify = 0x050;
    private const int InterruptStatus = 0x060;
    private const int InterruptACK = 0x064;
    private const int Status = 0x070;
    private const int QueueDescLow = 0x080;
    private const int QueueDescHigh = 0x084;
    private const int QueueDriverLow = 0x090;
    private const int QueueDriverHigh = 0x094;
    private const int QueueDeviceLow = 0x0a0;
    private const int QueueDeviceHigh = 0x0a4;
    private const int SHMSel = 0x0ac;
    private const int SHMLenLow = 0x0b0;
    private const int SHMLenHigh = 0x0b4;
    private const int SHMBaseLow = 0x0b8;
    private const int SHMBaseHigh = 0x0bc;
    private const int ConfigGeneration = 0x0fc;
    private const int Config = 0x100;

    private const uint MagicVirt = 0x74726976; // "virt", little-endian
    private const uint MmioVersion = 2;
    private const uint Vendor = 0x4B56_4D53;   // arbitrary; Linux matches any vendor (VIRTIO_DEV_ANY_ID)

    // InterruptStatus bits (§4.2.2).
    private const uint VIRTIO_MMIO_INT_VRING = 1;
    private const uint VIRTIO_MMIO_INT_CONFIG = 2;

    private readonly IInterruptLine _irq;
    private readonly VirtioTransportCore _core;

    // Guards _core and _queueSel (not _interruptStatus/_configGeneration, which are atomics).
    private readonly Lock _lock = new();
    private uint _queueSel;

    private int _interruptStatus;
    private int _configGeneration;

    /// <summary>Creates the transport for <paramref name="device"/>.</summary>
    /// <exception cref="ArgumentNullException">An argument is null.</exception>
    /// <exception cref="ArgumentException">The device offers no VERSION_1 feature or has an
    /// invalid queue maximum size.</exception>
    /// <param name="device">The virtio device.</param>
    /// <param name="memory">Guest memory the queues live in.</param>
    /// <param name="irq">The device's interrupt line (an edge per signal).</param>
    /// <param name="notifier">The VMM's queue events: where QueueNotify writes go.</param>
    public VirtioMmioTransport(IVirtioDevice device, GuestMemory memory, IInterruptLine irq, IVirtioQueueNotifier notifier)
    {
        ArgumentNullException.ThrowIfNull(irq);
        _irq = irq;
        _core = new VirtioTransportCore(device, memory, this, notifier);
    }

    /// <summary>The device status byte as the driver last set it (plus DEVICE_NEEDS_RESET).</summary>
    public byte DeviceStatus
    {
        get { lock (_lock) return _core.Status; }
    }

    /// <summary>The queues, for tests and for snapshotting.</summary>
    public IReadOnlyList<VirtQueue> Queues => _core.Queues;

    /// <inheritdoc/>
    public bool NotifyQueue(int queueIndex) => _core.NotifyQueue(queueIndex);

    /// <inheritdoc/>
    public void Signal(VirtioInterruptType type, int queueIndex)
    {
        if (type == VirtioInterruptType.Config)
        {
            Interlocked.Increment(ref _configGeneration);
            Interlocked.Or(ref _interruptStatus, (int)VIRTIO_MMIO_INT_CONFIG);
        }
        else
        {
            Interlocked.Or(ref _interruptStatus, (int)VIRTIO_MMIO_INT_VRING);
        }
        _irq.Trigger();
    }

    /// <inheritdoc/>
    public void Read(ulong offset, Span<byte> data)
    {
        if (offset >= Config)
        {
            lock (_lock)
                _core.Device.ReadConfig(offset - Config, data);
            return;
        }
        if (data.Length != 4 || offset % 4 != 0)
        {
            data.Clear(); // §4.2.2.2: the driver MUST use 32-bit aligned accesses
            return;
        }
        uint value;
        lock (_lock)
            value = ReadRegisterLocked((int)offset);
        BinaryPrimitives.WriteUInt32LittleEndian(data, value);
    }

    /// <inheritdoc/>
    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        if (offset >= Config)
        {
            lock (_lock)
                _core.Device.WriteConfig(offset - Config, data);
            return;
        }
        if (data.Length != 4 || offset % 4 != 0)
            return;
        uint value = BinaryPrimitives.ReadUInt32LittleEndian(data);
        if (offset == QueueNotifyOffset)
        {
            // With VIRTIO_F_NOTIFICATION_DATA unoffered, the value is the queue index.
            _core.Kick(value);
            return;
        }
        lock (_lock)
            WriteRegisterLocked((int)offset, value);
    }

    private VirtQueue? SelectedQueueLocked => _core.Queue(_queueSel);

    private uint ReadRegisterLocked(int offset)
    {
        switch (offset)
        {
            case MagicValue: return MagicVirt;
            case Version: return MmioVersion;
            case DeviceID: return _core.Device.DeviceType;
            case VendorID: return Vendor;
            case DeviceFeatures:
                return _core.DeviceFeaturesWindow;
            case QueueNumMax:
                // §4.2.2.1: 0 when the queue is not available.
                return SelectedQueueLocked?.MaxSize ?? 0u;
            case QueueNum:
                return _core.ReadQueueRegister(_queueSel, VirtioQueueRegister.Size);
            case QueueReady:
                return SelectedQueueLocked?.Ready == true ? 1u : 0u;
            case InterruptStatus:
                return (uint)Volatile.Read(ref _interruptStatus);
            case Status:
                return _core.Status;
            case QueueDescLow: return _core.ReadQueueRegister(_queueSel, VirtioQueueRegister.DescLow);
            case QueueDescHigh: return _core.ReadQueueRegister(_queueSel, VirtioQueueRegister.DescHigh);
            case QueueDriverLow: return _core.ReadQueueRegister(_queueSel, VirtioQueueRegister.DriverLow);
            case QueueDriverHigh: return _core.ReadQueueRegister(_queueSel, VirtioQueueRegister.DriverHigh);
            case QueueDeviceLow: return _core.ReadQueueRegister(_queueSel, VirtioQueueRegister.DeviceLow);
            case QueueDeviceHigh: return _core.ReadQueueRegister(_queueSel, VirtioQueueRegister.DeviceHigh);
            case SHMLenLow:
            case SHMLenHigh:
            case SHMBaseLow:
            case SHMBaseHigh:
                return uint.MaxValue; // §4.2.2: no shared memory region with this id (length -1)
            case ConfigGeneration:
                return (uint)Volatile.Read(ref _configGeneration);
            default:
                return 0; // write-only or reserved
        }
    }

    private void WriteRegisterLocked(int offset, uint value)
    {
        switch (offset)
        {
            case DeviceFeaturesSel:
                _core.DeviceFeaturesSelect = value;
                break;
            case DriverFeaturesSel:
                _core.DriverFeaturesSelect = value;
                break;
            case DriverFeatures:
                _core.WriteDriverFeatures(value);
                break;
            case QueueSel:
                _queueSel = value;
                break;
            case QueueNum: _core.WriteQueueRegister(_queueSel, VirtioQueueRegister.Size, value); break;
            case QueueReady:
                if (_core.TryGetConfigurableQueue(_queueSel, out VirtQueue? q))
                    q.Ready = (value & 1) != 0;
                break;
            case QueueDescLow: _core.WriteQueueRegister(_queueSel, VirtioQueueRegister.DescLow, value); break;
            case QueueDescHigh: _core.WriteQueueRegister(_queueSel, VirtioQueueRegister.DescHigh, value); break;
            case QueueDriverLow: _core.WriteQueueRegister(_queueSel, VirtioQueueRegister.DriverLow, value); break;
            case QueueDriverHigh: _core.WriteQueueRegister(_queueSel, VirtioQueueRegister.DriverHigh, value); break;
            case QueueDeviceLow: _core.WriteQueueRegister(_queueSel, VirtioQueueRegister.DeviceLow, value); break;
            case QueueDeviceHigh: _core.WriteQueueRegister(_queueSel, VirtioQueueRegister.DeviceHigh, value); break;
            case InterruptACK:
                Interlocked.And(ref _interruptStatus, ~(int)value);
                break;
            case Status:
                if (_core.WriteStatus((byte)value))
                {
                    // §4.2.2.1: reset clears InterruptStatus (the core cleared the queues).
                    _queueSel = 0;
                    Volatile.Write(ref _interruptStatus, 0);
                }
                break;
            case SHMSel:
            default:
                break; // read-only or reserved
        }
    }
}
