using System.Diagnostics.CodeAnalysis;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Virtio;

/// <summary>
/// Transport-independent device state shared by virtio-mmio and virtio-pci: the status byte,
/// feature negotiation, the queues and activation (virtio 1.2 §2.1, §2.2, §3.1.1).
/// </summary>
/// <remarks>Not thread-safe: the owning transport calls it under its lock, except
/// <see cref="Kick"/> (vCPU threads) and <see cref="NotifyQueue"/> (the I/O thread), which take
/// no lock so that a device signalling under its own lock never waits on the transport.</remarks>
internal sealed class VirtioTransportCore
{
    private readonly IVirtioDevice _device;
    private readonly GuestMemory _memory;
    private readonly IVirtioInterrupt _interrupt;
    private readonly IVirtioQueueNotifier _notifier;
    private volatile bool _activated;

    public VirtioTransportCore(IVirtioDevice device, GuestMemory memory, IVirtioInterrupt interrupt, IVirtioQueueNotifier notifier)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(notifier);
        if ((device.DeviceFeatures & VirtioFeatures.VERSION_1) == 0)
            throw new ArgumentException("A modern virtio transport needs a device that offers VIRTIO_F_VERSION_1.", nameof(device));
        _device = device;
        _memory = memory;
        _interrupt = interrupt;
        _notifier = notifier;
        Queues = new VirtQueue[device.QueueCount];
        for (int i = 0; i < Queues.Length; i++)
            Queues[i] = new VirtQueue(device.QueueMaxSize(i)); // throws ArgumentOutOfRangeException when invalid
    }

    public IVirtioDevice Device => _device;

    public VirtQueue[] Queues { get; }

    // The status byte as the driver wrote it, plus DEVICE_NEEDS_RESET after a failed activation.
    private byte _status;

    /// <summary>The device status register: what the driver wrote, plus DEVICE_NEEDS_RESET after
    /// a failed activation or while the running device is <see cref="IVirtioDevice.Broken"/>
    /// (virtio 1.2 §2.1.2).</summary>
    public byte Status => Activated && _device.Broken ? (byte)(_status | VirtioDeviceStatus.DEVICE_NEEDS_RESET) : _status;

    public uint DeviceFeaturesSelect { get; set; }

    public uint DriverFeaturesSelect { get; set; }

    public ulong DriverFeatures { get; private set; }

    public bool Activated => _activated;

    public bool HasStatus(byte bit) => (_status & bit) != 0;

    /// <summary>The 32 feature bits selected by <see cref="DeviceFeaturesSelect"/>.</summary>
    public uint DeviceFeaturesWindow => DeviceFeaturesSelect switch
    {
        0 => (uint)_device.DeviceFeatures,
        1 => (uint)(_device.DeviceFeatures >> 32),
        _ => 0,
    };

    /// <summary>The 32 accepted feature bits selected by <see cref="DriverFeaturesSelect"/>.</summary>
    public uint DriverFeaturesWindow => DriverFeaturesSelect switch
    {
        0 => (uint)DriverFeatures,
        1 => (uint)(DriverFeatures >> 32),
        _ => 0,
    };

    /// <summary>A notify-register write for queue <paramref name="queueIndex"/> reached the
    /// transport (no ioeventfd caught it): hand it to the VMM's queue event, never to the device
    /// on this (vCPU) thread. Out-of-range indices are dropped.</summary>
    public void Kick(ulong queueIndex)
    {
        if (queueIndex < (ulong)Queues.Length)
            _notifier.Notify((int)queueIndex);
    }

    /// <summary>Runs a kick on the I/O thread (see <see cref="IVirtioTransport.NotifyQueue"/>).</summary>
    public bool NotifyQueue(int queueIndex) =>
        _activated && (uint)queueIndex < (uint)Queues.Length && _device.QueueNotify(queueIndex);

    /// <summary>§3.1.1: features are written after DRIVER and before FEATURES_OK.</summary>
    public void WriteDriverFeatures(uint value)
    {
        if (!HasStatus(VirtioDeviceStatus.DRIVER) || HasStatus(VirtioDeviceStatus.FEATURES_OK))
            return;
        if (DriverFeaturesSelect == 0)
            DriverFeatures = (DriverFeatures & 0xFFFF_FFFF_0000_0000UL) | value;
        else if (DriverFeaturesSelect == 1)
            DriverFeatures = (DriverFeatures & 0xFFFF_FFFFUL) | ((ulong)value << 32);
    }

    /// <summary>Queue setup is allowed after FEATURES_OK and before DRIVER_OK (§3.1.1 steps 7-8).</summary>
    public bool QueueConfigurable =>
        HasStatus(VirtioDeviceStatus.FEATURES_OK) && !HasStatus(VirtioDeviceStatus.DRIVER_OK) && !HasStatus(VirtioDeviceStatus.FAILED);

    /// <summary>Queue <paramref name="index"/> (the transport's queue select), or null when there is none.</summary>
    public VirtQueue? Queue(uint index) => index < (uint)Queues.Length ? Queues[index] : null;

    /// <summary>Queue <paramref name="index"/> when its registers may be written (<see cref="QueueConfigurable"/>).</summary>
    public bool TryGetConfigurableQueue(uint index, [NotNullWhen(true)] out VirtQueue? queue)
    {
        queue = Queue(index);
        return queue is not null && QueueConfigurable;
    }

    /// <summary>Reads a queue register of queue <paramref name="index"/>; 0 for a queue that does
    /// not exist (§4.1.4.3.2, §4.2.2.1: size 0 means "not available").</summary>
    public uint ReadQueueRegister(uint index, VirtioQueueRegister register)
    {
        if (Queue(index) is not { } q)
            return 0;
        return register switch
        {
            VirtioQueueRegister.Size => q.Size,
            VirtioQueueRegister.DescLow => (uint)q.DescriptorTable.Value,
            VirtioQueueRegister.DescHigh => (uint)(q.DescriptorTable.Value >> 32),
            VirtioQueueRegister.DriverLow => (uint)q.AvailableRing.Value,
            VirtioQueueRegister.DriverHigh => (uint)(q.AvailableRing.Value >> 32),
            VirtioQueueRegister.DeviceLow => (uint)q.UsedRing.Value,
            _ => (uint)(q.UsedRing.Value >> 32),
        };
    }

    /// <summary>
    /// Applies a driver write to a queue register of queue <paramref name="index"/>: ignored for
    /// a queue that does not exist and outside the §3.1.1 window (after FEATURES_OK, before
    /// DRIVER_OK). The size is validated later, at queue enable and DRIVER_OK.
    /// </summary>
    public void WriteQueueRegister(uint index, VirtioQueueRegister register, uint value)
    {
        if (!TryGetConfigurableQueue(index, out VirtQueue? q))
            return;
        switch (register)
        {
            case VirtioQueueRegister.Size: q.Size = (ushort)Math.Min(value, ushort.MaxValue); break;
            case VirtioQueueRegister.DescLow: q.DescriptorTable = new GuestAddress(SetLow(q.DescriptorTable.Value, value)); break;
            case VirtioQueueRegister.DescHigh: q.DescriptorTable = new GuestAddress(SetHigh(q.DescriptorTable.Value, value)); break;
            case VirtioQueueRegister.DriverLow: q.AvailableRing = new GuestAddress(SetLow(q.AvailableRing.Value, value)); break;
            case VirtioQueueRegister.DriverHigh: q.AvailableRing = new GuestAddress(SetHigh(q.AvailableRing.Value, value)); break;
            case VirtioQueueRegister.DeviceLow: q.UsedRing = new GuestAddress(SetLow(q.UsedRing.Value, value)); break;
            default: q.UsedRing = new GuestAddress(SetHigh(q.UsedRing.Value, value)); break;
        }
    }

    private static ulong SetLow(ulong current, uint low) => (current & 0xFFFF_FFFF_0000_0000UL) | low;

    private static ulong SetHigh(ulong current, uint high) => (current & 0xFFFF_FFFFUL) | ((ulong)high << 32);

    /// <summary>Applies a driver write of the status byte.</summary>
    /// <returns>True when the write was a reset (status 0); the transport then resets its own state.</returns>
    public bool WriteStatus(byte value)
    {
        if (value == 0)
        {
            Reset();
            return true;
        }
        // DEVICE_NEEDS_RESET is the device's to set (§2.1.2): a driver that writes back the
        // status it read with the bit in it neither sets nor clears it.
        value = (byte)(value & ~VirtioDeviceStatus.DEVICE_NEEDS_RESET);
        byte driverBits = (byte)(_status & ~VirtioDeviceStatus.DEVICE_NEEDS_RESET);
        // §2.1.1: the driver only sets bits; clearing one needs a reset.
        if ((value & driverBits) != driverBits)
            return false;
        byte added = (byte)(value & ~driverBits);

        if ((added & VirtioDeviceStatus.FEATURES_OK) != 0)
        {
            // §3.1.1 steps 5-6: accept only a subset of what was offered, with VERSION_1.
            bool subset = (DriverFeatures & ~_device.DeviceFeatures) == 0;
            bool modern = (DriverFeatures & VirtioFeatures.VERSION_1) != 0;
            if (!subset || !modern || !HasStatus(VirtioDeviceStatus.DRIVER))
                value = (byte)(value & ~VirtioDeviceStatus.FEATURES_OK); // the driver reads it back unset
        }

        if ((added & VirtioDeviceStatus.DRIVER_OK) != 0 && !Activated)
        {
            if ((value & VirtioDeviceStatus.FEATURES_OK) == 0)
            {
                value = (byte)(value & ~VirtioDeviceStatus.DRIVER_OK);
            }
            else if (!Activate())
            {
                // §2.1.2: an unrecoverable device error is DEVICE_NEEDS_RESET plus a configuration
                // change notification.
                _status = (byte)(value | VirtioDeviceStatus.DEVICE_NEEDS_RESET);
                _interrupt.Signal(VirtioInterruptType.Config, 0);
                return false;
            }
        }
        _status = (byte)(value | (_status & VirtioDeviceStatus.DEVICE_NEEDS_RESET));
        return false;
    }

    private bool Activate()
    {
        bool eventIndex = (DriverFeatures & VirtioFeatures.RING_EVENT_IDX) != 0;
        foreach (var q in Queues)
        {
            if (q.Ready && !q.IsValid(_memory))
                return false;
            q.EventIndex = eventIndex;
        }
        if (!_device.Activate(_memory, DriverFeatures, Queues, _interrupt))
            return false;
        _activated = true;
        return true;
    }

    private void Reset()
    {
        if (Activated)
            _device.Reset();
        _activated = false;
        _status = 0;
        DriverFeatures = 0;
        DeviceFeaturesSelect = 0;
        DriverFeaturesSelect = 0;
        foreach (var q in Queues)
            q.Reset();
    }
}
