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
/// space; without one, a write there reaches <see cref="IVirtioDevice.QueueNotify"/>.</para>
/// <para>Threads: register accesses from vCPU threads serialise on one lock; device calls made
/// from it (config access, activate, reset, notify) run under it. Lock order: transport lock,
/// then whatever the device takes. <see cref="IVirtioInterrupt.Signal"/> takes no lock.</para>
/// </remarks>
public sealed class VirtioMmioTransport : IBusDevice, IVirtioInterrupt
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

    // Features a driver may accept without the device offering them: none. Features the
    // transport needs: VERSION_1 (this is a modern-only transport, §4.2.4 legacy interface absent).
    private const ulong RequiredFeatures = VirtioFeatures.VERSION_1;

    private readonly IVirtioDevice _device;
    private readonly GuestMemory _memory;
    private readonly IInterruptLine _irq;
    private readonly VirtQueue[] _queues;

    // Guards the fields below (not _interruptStatus/_configGeneration, which are atomics).
    private readonly Lock _lock = new();
    private byte _status;
    private uint _deviceFeaturesSel;
    private uint _driverFeaturesSel;
    private ulong _driverFeatures;
    private uint _queueSel;
    private bool _activated;

    private int _interruptStatus;
    private int _configGeneration;

    /// <summary>Creates the transport for <paramref name="device"/>.</summary>
    /// <exception cref="ArgumentNullException">An argument is null.</exception>
    /// <exception cref="ArgumentException">The device offers no VERSION_1 feature or has an
    /// invalid queue maximum size.</exception>
    public VirtioMmioTransport(IVirtioDevice device, GuestMemory memory, IInterruptLine irq)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(irq);
        if ((device.DeviceFeatures & RequiredFeatures) != RequiredFeatures)
            throw new ArgumentException("A virtio-mmio version 2 device must offer VIRTIO_F_VERSION_1.", nameof(device));
        _device = device;
        _memory = memory;
        _irq = irq;
        _queues = new VirtQueue[device.QueueCount];
        for (int i = 0; i < _queues.Length; i++)
            _queues[i] = new VirtQueue(device.QueueMaxSize(i)); // throws ArgumentOutOfRangeException when invalid
    }

    /// <summary>The device status byte as the driver last set it (plus DEVICE_NEEDS_RESET).</summary>
    public byte DeviceStatus
    {
        get { lock (_lock) return _status; }
    }

    /// <summary>The queues, for tests and for snapshotting.</summary>
    public IReadOnlyList<VirtQueue> Queues => _queues;

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
                _device.ReadConfig(offset - Config, data);
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
                _device.WriteConfig(offset - Config, data);
            return;
        }
        if (data.Length != 4 || offset % 4 != 0)
            return;
        uint value = BinaryPrimitives.ReadUInt32LittleEndian(data);
        lock (_lock)
            WriteRegisterLocked((int)offset, value);
    }

    private VirtQueue? SelectedQueueLocked => _queueSel < (uint)_queues.Length ? _queues[_queueSel] : null;

    private uint ReadRegisterLocked(int offset)
    {
        switch (offset)
        {
            case MagicValue: return MagicVirt;
            case Version: return MmioVersion;
            case DeviceID: return _device.DeviceType;
            case VendorID: return Vendor;
            case DeviceFeatures:
                return _deviceFeaturesSel switch
                {
                    0 => (uint)_device.DeviceFeatures,
                    1 => (uint)(_device.DeviceFeatures >> 32),
                    _ => 0,
                };
            case QueueNumMax:
                // §4.2.2.1: 0 when the queue is not available.
                return SelectedQueueLocked?.MaxSize ?? 0u;
            case QueueNum:
                return SelectedQueueLocked?.Size ?? 0u;
            case QueueReady:
                return SelectedQueueLocked?.Ready == true ? 1u : 0u;
            case InterruptStatus:
                return (uint)Volatile.Read(ref _interruptStatus);
            case Status:
                return _status;
            case QueueDescLow: return (uint)(SelectedQueueLocked?.DescriptorTable.Value ?? 0);
            case QueueDescHigh: return (uint)((SelectedQueueLocked?.DescriptorTable.Value ?? 0) >> 32);
            case QueueDriverLow: return (uint)(SelectedQueueLocked?.AvailableRing.Value ?? 0);
            case QueueDriverHigh: return (uint)((SelectedQueueLocked?.AvailableRing.Value ?? 0) >> 32);
            case QueueDeviceLow: return (uint)(SelectedQueueLocked?.UsedRing.Value ?? 0);
            case QueueDeviceHigh: return (uint)((SelectedQueueLocked?.UsedRing.Value ?? 0) >> 32);
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
                _deviceFeaturesSel = value;
                break;
            case DriverFeaturesSel:
                _driverFeaturesSel = value;
                break;
            case DriverFeatures:
                // §3.1.1: features are written after DRIVER and before FEATURES_OK.
                if (!HasStatus(VirtioDeviceStatus.DRIVER) || HasStatus(VirtioDeviceStatus.FEATURES_OK))
                    break;
                if (_driverFeaturesSel == 0)
                    _driverFeatures = (_driverFeatures & 0xFFFF_FFFF_0000_0000UL) | value;
                else if (_driverFeaturesSel == 1)
                    _driverFeatures = (_driverFeatures & 0xFFFF_FFFFUL) | ((ulong)value << 32);
                break;
            case QueueSel:
                _queueSel = value;
                break;
            case QueueNum:
                if (QueueConfigurableLocked(out VirtQueue? q))
                    q.Size = (ushort)Math.Min(value, ushort.MaxValue); // validated at QueueReady/DRIVER_OK
                break;
            case QueueReady:
                if (QueueConfigurableLocked(out q))
                    q.Ready = (value & 1) != 0;
                break;
            case QueueDescLow:
                if (QueueConfigurableLocked(out q))
                    q.DescriptorTable = new GuestAddress(SetLow(q.DescriptorTable.Value, value));
                break;
            case QueueDescHigh:
                if (QueueConfigurableLocked(out q))
                    q.DescriptorTable = new GuestAddress(SetHigh(q.DescriptorTable.Value, value));
                break;
            case QueueDriverLow:
                if (QueueConfigurableLocked(out q))
                    q.AvailableRing = new GuestAddress(SetLow(q.AvailableRing.Value, value));
                break;
            case QueueDriverHigh:
                if (QueueConfigurableLocked(out q))
                    q.AvailableRing = new GuestAddress(SetHigh(q.AvailableRing.Value, value));
                break;
            case QueueDeviceLow:
                if (QueueConfigurableLocked(out q))
                    q.UsedRing = new GuestAddress(SetLow(q.UsedRing.Value, value));
                break;
            case QueueDeviceHigh:
                if (QueueConfigurableLocked(out q))
                    q.UsedRing = new GuestAddress(SetHigh(q.UsedRing.Value, value));
                break;
            case QueueNotify:
                // With VIRTIO_F_NOTIFICATION_DATA unoffered, the value is the queue index.
                if (_activated && value < (uint)_queues.Length)
                    _device.QueueNotify((int)value);
                break;
            case InterruptACK:
                Interlocked.And(ref _interruptStatus, ~(int)value);
                break;
            case Status:
                WriteStatusLocked((byte)value);
                break;
            case SHMSel:
            default:
                break; // read-only or reserved
        }
    }

    /// <summary>Queue registers may be written after FEATURES_OK and before DRIVER_OK (§3.1.1 steps 7-8).</summary>
    private bool QueueConfigurableLocked([System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out VirtQueue? queue)
    {
        queue = SelectedQueueLocked;
        return queue is not null
            && HasStatus(VirtioDeviceStatus.FEATURES_OK)
            && !HasStatus(VirtioDeviceStatus.DRIVER_OK)
            && !HasStatus(VirtioDeviceStatus.FAILED);
    }

    private bool HasStatus(byte bit) => (_status & bit) != 0;

    private void WriteStatusLocked(byte value)
    {
        if (value == 0)
        {
            ResetLocked();
            return;
        }
        // §2.1.1: the driver only sets bits (it never clears one except by reset).
        byte added = (byte)(value & ~_status);
        if ((value & _status) != _status)
            return; // clearing bits without a reset: ignored

        if ((added & VirtioDeviceStatus.FEATURES_OK) != 0)
        {
            // §3.1.1 step 5-6: accept only a subset of what was offered, with VERSION_1.
            bool subset = (_driverFeatures & ~_device.DeviceFeatures) == 0;
            bool modern = (_driverFeatures & VirtioFeatures.VERSION_1) != 0;
            if (!subset || !modern || !HasStatus(VirtioDeviceStatus.DRIVER))
                value = (byte)(value & ~VirtioDeviceStatus.FEATURES_OK); // driver sees it not set
        }

        if ((added & VirtioDeviceStatus.DRIVER_OK) != 0 && !_activated)
        {
            if ((value & VirtioDeviceStatus.FEATURES_OK) == 0)
            {
                value = (byte)(value & ~VirtioDeviceStatus.DRIVER_OK);
            }
            else if (!ActivateLocked())
            {
                // §2.1.2: the device signals an unrecoverable error with DEVICE_NEEDS_RESET and a
                // configuration change notification.
                _status = (byte)(value | VirtioDeviceStatus.DEVICE_NEEDS_RESET);
                Signal(VirtioInterruptType.Config, 0);
                return;
            }
        }
        _status = (byte)(value | (_status & VirtioDeviceStatus.DEVICE_NEEDS_RESET));
    }

    private bool ActivateLocked()
    {
        foreach (var q in _queues)
        {
            if (q.Ready && !q.IsValid(_memory))
                return false;
            q.EventIndex = (_driverFeatures & VirtioFeatures.RING_EVENT_IDX) != 0;
        }
        if (!_device.Activate(_memory, _driverFeatures, _queues, this))
            return false;
        _activated = true;
        return true;
    }

    private void ResetLocked()
    {
        // §4.2.2.1: reset clears InterruptStatus and every QueueReady.
        if (_activated)
            _device.Reset();
        _activated = false;
        _status = 0;
        _driverFeatures = 0;
        _deviceFeaturesSel = 0;
        _driverFeaturesSel = 0;
        _queueSel = 0;
        foreach (var q in _queues)
            q.Reset();
        Volatile.Write(ref _interruptStatus, 0);
    }

    private static ulong SetLow(ulong current, uint low) => (current & 0xFFFF_FFFF_0000_0000UL) | low;

    private static ulong SetHigh(ulong current, uint high) => (current & 0xFFFF_FFFFUL) | ((ulong)high << 32);
}
