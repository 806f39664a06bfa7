using System.Buffers.Binary;
using KvmSharp.Devices.Pci;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>
/// The virtio-pci transport for modern (non-transitional) devices (virtio 1.2 §4.1): a PCI
/// function with vendor 0x1AF4 and device ID 0x1040 + device type (§4.1.2.1), its virtio
/// structures in BAR 0 and its MSI-X table in BAR 2. Add it to a <see cref="PciRoot"/>.
/// </summary>
/// <remarks>
/// <para><b>BAR 0</b> (64-bit memory, <see cref="Bar0Size"/>): common configuration at 0x0000
/// (§4.1.4.3), ISR status at 0x1000 (§4.1.4.5), device configuration at 0x2000 (§4.1.4.6) and
/// notification at 0x3000 (§4.1.4.4), where queue <i>n</i> is notified by a write at
/// 0x3000 + 4·<i>n</i> (queue_notify_off = <i>n</i>, notify_off_multiplier = 4). The VMM should
/// attach an ioeventfd to each queue's notify address (see <see cref="NotifyOffset"/>) and move
/// it when <see cref="IPciBarObserver"/> reports the BAR moved; without one, a write there reaches
/// the <see cref="IVirtioQueueNotifier"/>, which signals the same queue event.</para>
/// <para><b>BAR 2</b> (64-bit memory, <see cref="MsixTable.RegionSize"/>): MSI-X table and PBA,
/// one vector per queue plus one for configuration changes.</para>
/// <para><b>Interrupts.</b> With MSI-X enabled, a queue or configuration interrupt goes to the
/// vector the driver chose (none when it chose VIRTIO_MSI_NO_VECTOR). Otherwise the ISR bit is
/// set (§4.1.4.5) and INTA# is a level: asserted while ISR is non-zero, MSI-X is off and the
/// command register's Interrupt Disable bit is clear; reading ISR clears it and deasserts.</para>
/// <para>Capabilities present (§4.1.4): common, notify, ISR, device and PCI configuration access
/// (VIRTIO_PCI_CAP_PCI_CFG, §4.1.4.9), then MSI-X.</para>
/// <para><b>Threads.</b> BAR accesses serialise on the transport's lock; configuration space
/// accesses come under the <see cref="PciRoot"/>'s lock and take this one inside it. Lock order:
/// root, transport, device, MSI-X table. <see cref="Signal"/> and <see cref="NotifyQueue"/> take no transport lock.</para>
/// </remarks>
public sealed class VirtioPciTransport : IPciDevice, IVirtioInterrupt, IVirtioTransport
{
    /// <summary>Size of BAR 0.</summary>
    public const ulong Bar0Size = 0x4000;

    /// <summary>Offset of the notification structure in BAR 0.</summary>
    public const ulong NotifyOffset = 0x3000;

    /// <summary>notify_off_multiplier: bytes between two queues' notify addresses.</summary>
    public const uint NotifyOffMultiplier = 4;

    /// <summary>VIRTIO_MSI_NO_VECTOR (§4.1.5.1.2).</summary>
    public const ushort NoVector = 0xFFFF;

    private const ushort VirtioVendorId = 0x1AF4;
    private const ushort ModernDeviceIdBase = 0x1040;

    // Regions in BAR 0.
    private const ulong CommonOffset = 0x0000;
    private const ulong CommonSize = 0x38;    // through queue_device (queue_reset not offered)
    private const ulong IsrOffset = 0x1000;
    private const ulong DeviceConfigOffset = 0x2000;
    private const ulong RegionStride = 0x1000;

    // Capability cfg_type values (§4.1.4).
    private const byte VIRTIO_PCI_CAP_COMMON_CFG = 1;
    private const byte VIRTIO_PCI_CAP_NOTIFY_CFG = 2;
    private const byte VIRTIO_PCI_CAP_ISR_CFG = 3;
    private const byte VIRTIO_PCI_CAP_DEVICE_CFG = 4;
    private const byte VIRTIO_PCI_CAP_PCI_CFG = 5;
    private const byte PCI_CAP_ID_VNDR = 0x09;
    private const byte PCI_CAP_ID_MSIX = 0x11;

    // Common configuration fields (§4.1.4.3, struct virtio_pci_common_cfg).
    private const int device_feature_select = 0x00;
    private const int device_feature = 0x04;
    private const int driver_feature_select = 0x08;
    private const int driver_feature = 0x0C;
    private const int config_msix_vector = 0x10;
    private const int num_queues = 0x12;
    private const int device_status = 0x14;
    private const int config_generation = 0x15;
    private const int queue_select = 0x16;
    private const int queue_size = 0x18;
    private const int queue_msix_vector = 0x1A;
    private const int queue_enable = 0x1C;
    private const int queue_notify_off = 0x1E;
    private const int queue_desc = 0x20;
    private const int queue_driver = 0x28;
    private const int queue_device = 0x30;

    // ISR bits (§4.1.4.5).
    private const byte ISR_QUEUE = 1;
    private const byte ISR_CONFIG = 2;

    private const int MsixBar = 2;

    private readonly VirtioTransportCore _core;
    private readonly MsixTable _msix;
    private readonly ILevelInterruptLine _intx;
    private readonly ushort[] _queueVectors;
    private readonly int _msixCapability;
    private readonly int _pciCfgCapability;

    // Guards _core, _queueSelect, _configVector, _queueVectors.
    private readonly Lock _lock = new();
    private ushort _queueSelect;
    private ushort _configVector = NoVector;
    private int _configGeneration;

    // INTx state: a leaf lock, never held while calling anything but the line itself.
    private readonly Lock _intxLock = new();
    private int _isr;
    private bool _intxAsserted;
    private bool _intxDisabled;

    /// <summary>Creates the PCI function for <paramref name="device"/> with BARs at the given addresses.</summary>
    /// <param name="device">The virtio device.</param>
    /// <param name="memory">Guest memory the queues live in.</param>
    /// <param name="msi">Delivers MSI-X messages.</param>
    /// <param name="intx">INTA# (level), used while MSI-X is disabled.</param>
    /// <param name="notifier">The VMM's queue events: where notify-register writes go.</param>
    /// <param name="bar0Address">Initial address of BAR 0 (aligned to <see cref="Bar0Size"/>).</param>
    /// <param name="bar2Address">Initial address of BAR 2 (aligned to <see cref="MsixTable.RegionSize"/>).</param>
    /// <exception cref="ArgumentNullException">An argument is null.</exception>
    /// <exception cref="ArgumentException">The device does not offer VERSION_1, or has more queues than vectors fit.</exception>
    /// <exception cref="ArgumentOutOfRangeException">A BAR address is misaligned.</exception>
    public VirtioPciTransport(IVirtioDevice device, GuestMemory memory, IMsiSink msi, ILevelInterruptLine intx,
        IVirtioQueueNotifier notifier, ulong bar0Address, ulong bar2Address)
    {
        ArgumentNullException.ThrowIfNull(intx);
        _core = new VirtioTransportCore(device, memory, this, notifier);
        int queues = _core.Queues.Length;
        if (queues + 1 > MsixTable.MaxVectors)
            throw new ArgumentException("Too many queues for the MSI-X table.", nameof(device));
        _intx = intx;
        _msix = new MsixTable(queues + 1, msi);
        _queueVectors = new ushort[queues];
        Array.Fill(_queueVectors, NoVector);

        Config = new PciConfigSpace(VirtioVendorId, (ushort)(ModernDeviceIdBase + device.DeviceType),
            ClassCode(device.DeviceType), revision: 1, subsystemVendorId: VirtioVendorId, subsystemId: 0x1100);
        Config.AddBar(0, PciBarKind.Memory64, Bar0Size, bar0Address, new Bar0Region(this));
        Config.AddBar(MsixBar, PciBarKind.Memory64, MsixTable.RegionSize, bar2Address, _msix);
        Config.SetInterrupt(1, 0); // INTA#; the line is what the VMM routes, reported by ACPI/MP tables

        AddVirtioCapability(VIRTIO_PCI_CAP_COMMON_CFG, CommonOffset, (uint)CommonSize);
        AddVirtioCapability(VIRTIO_PCI_CAP_NOTIFY_CFG, NotifyOffset, (uint)Math.Max(1, queues) * NotifyOffMultiplier,
            extra: BitConverter.GetBytes(NotifyOffMultiplier));
        AddVirtioCapability(VIRTIO_PCI_CAP_ISR_CFG, IsrOffset, 1);
        AddVirtioCapability(VIRTIO_PCI_CAP_DEVICE_CFG, DeviceConfigOffset, (uint)RegionStride);
        // §4.1.4.9: bar, offset, length and pci_cfg_data are writable.
        var pciCfgMask = new byte[18];
        pciCfgMask[2] = 0xFF;                          // bar
        pciCfgMask.AsSpan(6, 12).Fill(0xFF);           // offset, length, pci_cfg_data
        _pciCfgCapability = AddVirtioCapability(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, extra: new byte[4], writableMask: pciCfgMask);
        var (body, mask) = MsixTable.CapabilityBody(queues + 1, MsixBar);
        _msixCapability = Config.AddCapability(PCI_CAP_ID_MSIX, body, mask);
    }

    /// <inheritdoc/>
    public PciConfigSpace Config { get; }

    /// <summary>The device status byte.</summary>
    public byte DeviceStatus
    {
        get { lock (_lock) return _core.Status; }
    }

    /// <summary>The queues, for tests and snapshots.</summary>
    public IReadOnlyList<VirtQueue> Queues => _core.Queues;

    /// <summary>The MSI-X table (BAR 2's region).</summary>
    public MsixTable Msix => _msix;

    /// <inheritdoc/>
    public void ConfigWritten(int offset, int length)
    {
        int end = offset + length;
        if (offset < _msixCapability + 4 && end > _msixCapability + 2)
        {
            _msix.SetControl(Config.GetUInt16(_msixCapability + 2));
            UpdateIntx(isrClear: 0, isrSet: 0);
        }
        if (offset < PciConfigSpace.COMMAND + 2 && end > PciConfigSpace.COMMAND)
        {
            lock (_intxLock)
                _intxDisabled = (Config.Command & PciConfigSpace.COMMAND_INTX_DISABLE) != 0;
            UpdateIntx(isrClear: 0, isrSet: 0);
        }
        int dataOffset = _pciCfgCapability + 16;
        if (offset < dataOffset + 4 && end > dataOffset)
            PciCfgAccess(write: true);
    }

    /// <inheritdoc/>
    /// <remarks>Refreshes pci_cfg_data (§4.1.4.9: a read of it returns the BAR bytes selected by
    /// bar, offset and length).</remarks>
    public void ConfigReading(int offset, int length)
    {
        int dataOffset = _pciCfgCapability + 16;
        if (offset < dataOffset + 4 && offset + length > dataOffset)
            PciCfgAccess(write: false);
    }

    /// <inheritdoc/>
    /// <remarks>The queue's event fired: KVM's ioeventfd on the notify region (virtio 1.2
    /// §4.1.4.4) or a notify write that reached the bus.</remarks>
    public bool NotifyQueue(int queueIndex) => _core.NotifyQueue(queueIndex);

    /// <inheritdoc/>
    public void Signal(VirtioInterruptType type, int queueIndex)
    {
        // No transport lock here: devices signal while holding their own lock, and the transport
        // calls into devices while holding its lock; taking it here would invert that order.
        // The vectors are 16-bit fields, read atomically.
        ushort vector;
        if (type == VirtioInterruptType.Config)
        {
            Interlocked.Increment(ref _configGeneration);
            vector = Volatile.Read(ref _configVector);
        }
        else
        {
            vector = (uint)queueIndex < (uint)_queueVectors.Length ? Volatile.Read(ref _queueVectors[queueIndex]) : NoVector;
        }
        if (_msix.Enabled)
        {
            if (vector != NoVector)
                _msix.Trigger(vector);
            return;
        }
        UpdateIntx(isrClear: 0, isrSet: type == VirtioInterruptType.Config ? ISR_CONFIG : ISR_QUEUE);
    }

    /// <summary>Applies an ISR change and drives INTA# to match (PCI LB 3.0 §2.2.6: level, shared).</summary>
    /// <returns>The ISR value before the change.</returns>
    private int UpdateIntx(int isrClear, int isrSet)
    {
        lock (_intxLock)
        {
            int before = _isr;
            _isr = (before & ~isrClear) | isrSet;
            bool level = _isr != 0 && !_intxDisabled && !_msix.Enabled;
            if (level != _intxAsserted)
            {
                _intxAsserted = level;
                _intx.SetLevel(level);
            }
            return before;
        }
    }

    private int AddVirtioCapability(byte cfgType, ulong offset, uint length, byte[]? extra = null, byte[]? writableMask = null)
    {
        // struct virtio_pci_cap (§4.1.4): cap_len, cfg_type, bar, id, padding[2], offset, length.
        int extraLength = extra?.Length ?? 0;
        var body = new byte[14 + extraLength];
        body[0] = (byte)(16 + extraLength); // cap_len counts from cap_vndr
        body[1] = cfgType;
        body[2] = 0;                        // bar
        BinaryPrimitives.WriteUInt32LittleEndian(body.AsSpan(6), (uint)offset);
        BinaryPrimitives.WriteUInt32LittleEndian(body.AsSpan(10), length);
        extra?.CopyTo(body, 14);
        return Config.AddCapability(PCI_CAP_ID_VNDR, body, writableMask);
    }

    private void PciCfgAccess(bool write)
    {
        int cap = _pciCfgCapability;
        byte bar = Config.GetUInt8(cap + 4);
        uint offset = Config.GetUInt32(cap + 8);
        uint length = Config.GetUInt32(cap + 12);
        // §4.1.4.9: length 1, 2 or 4, offset aligned to it; only BAR 0 holds virtio structures.
        if (bar != 0 || (length != 1 && length != 2 && length != 4) || offset % length != 0 || offset + length > Bar0Size)
            return;
        Span<byte> data = stackalloc byte[4];
        if (write)
        {
            Config.Read(cap + 16, data);
            Bar0Write(offset, data[..(int)length]);
        }
        else
        {
            Bar0Read(offset, data[..(int)length]);
            Config.SetUInt32(cap + 16, BinaryPrimitives.ReadUInt32LittleEndian(data));
        }
    }

    private static uint ClassCode(uint deviceType) => deviceType switch
    {
        VirtioDeviceType.Net => 0x02_00_00,     // network controller, Ethernet
        VirtioDeviceType.Block => 0x01_00_00,   // mass storage, SCSI (as QEMU reports virtio-blk)
        VirtioDeviceType.Console => 0x07_80_00, // communication controller, other
        _ => 0xFF_00_00,                        // unclassified
    };

    private void Bar0Read(ulong offset, Span<byte> data)
    {
        if (offset < CommonOffset + RegionStride)
        {
            lock (_lock)
                CommonRead((int)(offset - CommonOffset), data);
        }
        else if (offset < IsrOffset + RegionStride)
        {
            data.Clear();
            if (offset == IsrOffset && !data.IsEmpty)
                data[0] = (byte)UpdateIntx(isrClear: ~0, isrSet: 0); // reading ISR clears it (§4.1.4.5)
        }
        else if (offset < DeviceConfigOffset + RegionStride)
        {
            lock (_lock)
                _core.Device.ReadConfig(offset - DeviceConfigOffset, data);
        }
        else
        {
            data.Clear(); // notify region reads as 0
        }
    }

    private void Bar0Write(ulong offset, ReadOnlySpan<byte> data)
    {
        if (offset < CommonOffset + RegionStride)
        {
            lock (_lock)
                CommonWrite((int)(offset - CommonOffset), data);
        }
        else if (offset < IsrOffset + RegionStride)
        {
            // ISR is read-only.
        }
        else if (offset < DeviceConfigOffset + RegionStride)
        {
            lock (_lock)
                _core.Device.WriteConfig(offset - DeviceConfigOffset, data);
        }
        else
        {
            _core.Kick((offset - NotifyOffset) / NotifyOffMultiplier);
        }
    }

    private VirtQueue? SelectedQueueLocked => _core.Queue(_queueSelect);

    /// <summary>The queue address half at common-configuration <paramref name="offset"/> (low at the field, high 4 bytes on).</summary>
    private static VirtioQueueRegister AddressHalf(int offset) => offset switch
    {
        queue_desc => VirtioQueueRegister.DescLow,
        queue_desc + 4 => VirtioQueueRegister.DescHigh,
        queue_driver => VirtioQueueRegister.DriverLow,
        queue_driver + 4 => VirtioQueueRegister.DriverHigh,
        queue_device => VirtioQueueRegister.DeviceLow,
        _ => VirtioQueueRegister.DeviceHigh,
    };

    private void CommonRead(int offset, Span<byte> data)
    {
        data.Clear();
        // §4.1.3.1: fields are accessed with their own width; a 64-bit field may be accessed as two 32-bit halves.
        uint value;
        VirtQueue? q = SelectedQueueLocked;
        switch (offset, data.Length)
        {
            case (device_feature_select, 4): value = _core.DeviceFeaturesSelect; break;
            case (device_feature, 4): value = _core.DeviceFeaturesWindow; break;
            case (driver_feature_select, 4): value = _core.DriverFeaturesSelect; break;
            case (driver_feature, 4): value = _core.DriverFeaturesWindow; break;
            case (config_msix_vector, 2): value = _configVector; break;
            case (num_queues, 2): value = (uint)_core.Queues.Length; break;
            case (device_status, 1): value = _core.Status; break;
            case (config_generation, 1): value = (byte)Volatile.Read(ref _configGeneration); break;
            case (queue_select, 2): value = _queueSelect; break;
            case (queue_size, 2): value = _core.ReadQueueRegister(_queueSelect, VirtioQueueRegister.Size); break; // 0: unavailable (§4.1.4.3.2)
            case (queue_msix_vector, 2): value = q is null ? NoVector : _queueVectors[_queueSelect]; break;
            case (queue_enable, 2): value = q?.Ready == true ? 1u : 0u; break;
            case (queue_notify_off, 2): value = q is null ? 0u : _queueSelect; break;
            case (queue_desc or queue_driver or queue_device or queue_desc + 4 or queue_driver + 4 or queue_device + 4, 4):
                value = _core.ReadQueueRegister(_queueSelect, AddressHalf(offset));
                break;
            case (queue_desc or queue_driver or queue_device, 8):
                VirtioQueueRegister low = AddressHalf(offset);
                BinaryPrimitives.WriteUInt32LittleEndian(data, _core.ReadQueueRegister(_queueSelect, low));
                BinaryPrimitives.WriteUInt32LittleEndian(data[4..], _core.ReadQueueRegister(_queueSelect, low + 1));
                return;
            default: return; // reserved or mis-sized: reads 0
        }
        for (int i = 0; i < data.Length; i++)
            data[i] = (byte)(value >> (8 * i));
    }

    private void CommonWrite(int offset, ReadOnlySpan<byte> data)
    {
        ulong value = 0;
        for (int i = 0; i < data.Length && i < 8; i++)
            value |= (ulong)data[i] << (8 * i);
        VirtQueue? q = SelectedQueueLocked;
        switch (offset, data.Length)
        {
            case (device_feature_select, 4): _core.DeviceFeaturesSelect = (uint)value; break;
            case (driver_feature_select, 4): _core.DriverFeaturesSelect = (uint)value; break;
            case (driver_feature, 4): _core.WriteDriverFeatures((uint)value); break;
            case (config_msix_vector, 2):
                // §4.1.5.1.2: an unusable vector reads back as NO_VECTOR.
                _configVector = value < (ulong)_msix.VectorCount ? (ushort)value : NoVector;
                break;
            case (device_status, 1):
                if (_core.WriteStatus((byte)value))
                {
                    _queueSelect = 0;
                    _configVector = NoVector;
                    Array.Fill(_queueVectors, NoVector);
                    UpdateIntx(isrClear: ~0, isrSet: 0);
                }
                break;
            case (queue_select, 2): _queueSelect = (ushort)value; break;
            case (queue_size, 2): _core.WriteQueueRegister(_queueSelect, VirtioQueueRegister.Size, (uint)value); break;
            case (queue_msix_vector, 2):
                if (q is not null)
                    _queueVectors[_queueSelect] = value < (ulong)_msix.VectorCount ? (ushort)value : NoVector;
                break;
            case (queue_enable, 2):
                // §4.1.4.3.2: the driver writes 1 only; 0 is not a way to disable a queue.
                if (value == 1 && _core.TryGetConfigurableQueue(_queueSelect, out VirtQueue? ready))
                    ready.Ready = true;
                break;
            case (queue_desc or queue_driver or queue_device or queue_desc + 4 or queue_driver + 4 or queue_device + 4, 4):
                _core.WriteQueueRegister(_queueSelect, AddressHalf(offset), (uint)value);
                break;
            case (queue_desc or queue_driver or queue_device, 8):
                _core.WriteQueueRegister(_queueSelect, AddressHalf(offset), (uint)value);
                _core.WriteQueueRegister(_queueSelect, AddressHalf(offset) + 1, (uint)(value >> 32));
                break;
            default: break; // read-only, reserved or mis-sized
        }
    }

    /// <summary>BAR 0 as a bus region.</summary>
    private sealed class Bar0Region(VirtioPciTransport owner) : IBusDevice
    {
        public void Read(ulong offset, Span<byte> data) => owner.Bar0Read(offset, data);

        public void Write(ulong offset, ReadOnlySpan<byte> data) => owner.Bar0Write(offset, data);
    }
}
