using System.Buffers.Binary;
using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

internal sealed class FakeVirtioDevice : IVirtioDevice
{
    public readonly byte[] ConfigSpace = [1, 2, 3, 4, 5, 6, 7, 8];
    public ulong Offered = VirtioFeatures.VERSION_1 | VirtioFeatures.RING_EVENT_IDX | 1; // bit 0: device-specific
    public bool ActivateResult = true;
    public int Activations, Resets;
    public ulong NegotiatedFeatures;
    public IVirtioInterrupt? Interrupt;
    public IReadOnlyList<VirtQueue>? ActiveQueues;
    public readonly List<int> Notified = [];

    public uint DeviceType => VirtioDeviceType.Entropy;
    public ulong DeviceFeatures => Offered;
    public int QueueCount => 2;
    public ushort QueueMaxSize(int index) => index == 0 ? (ushort)256 : (ushort)16;

    public void ReadConfig(ulong offset, Span<byte> data)
    {
        data.Clear();
        for (int i = 0; i < data.Length; i++)
            if (offset + (ulong)i < (ulong)ConfigSpace.Length)
                data[i] = ConfigSpace[offset + (ulong)i];
    }

    public void WriteConfig(ulong offset, ReadOnlySpan<byte> data)
    {
        for (int i = 0; i < data.Length; i++)
            if (offset + (ulong)i < (ulong)ConfigSpace.Length)
                ConfigSpace[offset + (ulong)i] = data[i];
    }

    public bool Activate(GuestMemory memory, ulong negotiatedFeatures, IReadOnlyList<VirtQueue> queues, IVirtioInterrupt interrupt)
    {
        Activations++;
        NegotiatedFeatures = negotiatedFeatures;
        ActiveQueues = queues;
        Interrupt = interrupt;
        return ActivateResult;
    }

    public void Reset() => Resets++;

    /// <summary>Set by a test to stand for a device that stopped on an impossible ring.</summary>
    public bool Broken { get; set; }

    public bool QueueNotify(int queueIndex)
    {
        Notified.Add(queueIndex);
        return false;
    }
}

public sealed class VirtioMmioTransportTests : IDisposable
{
    // Register offsets as Linux include/uapi/linux/virtio_mmio.h names them.
    private const ulong VIRTIO_MMIO_MAGIC_VALUE = 0x000, VIRTIO_MMIO_VERSION = 0x004, VIRTIO_MMIO_DEVICE_ID = 0x008,
        VIRTIO_MMIO_VENDOR_ID = 0x00c, VIRTIO_MMIO_DEVICE_FEATURES = 0x010, VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014,
        VIRTIO_MMIO_DRIVER_FEATURES = 0x020, VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024, VIRTIO_MMIO_QUEUE_SEL = 0x030,
        VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034, VIRTIO_MMIO_QUEUE_NUM = 0x038, VIRTIO_MMIO_QUEUE_READY = 0x044,
        VIRTIO_MMIO_QUEUE_NOTIFY = 0x050, VIRTIO_MMIO_INTERRUPT_STATUS = 0x060, VIRTIO_MMIO_INTERRUPT_ACK = 0x064,
        VIRTIO_MMIO_STATUS = 0x070, VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080, VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084,
        VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090, VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094, VIRTIO_MMIO_QUEUE_USED_LOW = 0x0a0,
        VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0a4, VIRTIO_MMIO_SHM_LEN_LOW = 0x0b0, VIRTIO_MMIO_CONFIG_GENERATION = 0x0fc,
        VIRTIO_MMIO_CONFIG = 0x100;
    private const uint ACK = 1, DRIVER = 2, DRIVER_OK = 4, FEATURES_OK = 8, NEEDS_RESET = 64;

    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);
    private readonly FakeVirtioDevice _device = new();
    private readonly CountingLine _irq = new();
    private readonly VirtioMmioTransport _mmio;

    public VirtioMmioTransportTests() => _mmio = TestTransports.Mmio(_device, _memory, _irq);

    public void Dispose() => _memory.Dispose();

    private uint Read(ulong offset)
    {
        Span<byte> b = stackalloc byte[4];
        _mmio.Read(offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private void Write(ulong offset, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _mmio.Write(offset, b);
    }

    private void SetupQueue(uint index, uint size, ulong desc, ulong avail, ulong used)
    {
        // Linux vm_setup_vq.
        Write(VIRTIO_MMIO_QUEUE_SEL, index);
        Assert.Equal(0u, Read(VIRTIO_MMIO_QUEUE_READY));
        Assert.True(Read(VIRTIO_MMIO_QUEUE_NUM_MAX) >= size);
        Write(VIRTIO_MMIO_QUEUE_NUM, size);
        Write(VIRTIO_MMIO_QUEUE_DESC_LOW, (uint)desc);
        Write(VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint)(desc >> 32));
        Write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, (uint)avail);
        Write(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (uint)(avail >> 32));
        Write(VIRTIO_MMIO_QUEUE_USED_LOW, (uint)used);
        Write(VIRTIO_MMIO_QUEUE_USED_HIGH, (uint)(used >> 32));
        Write(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    private void NegotiateFeatures(ulong features)
    {
        Write(VIRTIO_MMIO_STATUS, 0);
        Write(VIRTIO_MMIO_STATUS, ACK);
        Write(VIRTIO_MMIO_STATUS, ACK | DRIVER);
        Write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        Write(VIRTIO_MMIO_DRIVER_FEATURES, (uint)(features >> 32));
        Write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        Write(VIRTIO_MMIO_DRIVER_FEATURES, (uint)features);
        Write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    }

    [Fact]
    public void LinuxProbe_FullBringUp()
    {
        // vm_probe: magic, version 2, device id, vendor.
        Assert.Equal(0x74726976u, Read(VIRTIO_MMIO_MAGIC_VALUE));
        Assert.Equal(2u, Read(VIRTIO_MMIO_VERSION));
        Assert.Equal(VirtioDeviceType.Entropy, Read(VIRTIO_MMIO_DEVICE_ID));
        Read(VIRTIO_MMIO_VENDOR_ID);

        // virtio_dev_probe: reset, ACK, DRIVER, features.
        Write(VIRTIO_MMIO_STATUS, 0);
        Write(VIRTIO_MMIO_STATUS, ACK);
        Write(VIRTIO_MMIO_STATUS, ACK | DRIVER);
        Write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        ulong features = (ulong)Read(VIRTIO_MMIO_DEVICE_FEATURES) << 32;
        Write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        features |= Read(VIRTIO_MMIO_DEVICE_FEATURES);
        Assert.Equal(_device.Offered, features);
        Write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        Write(VIRTIO_MMIO_DRIVER_FEATURES, (uint)(features >> 32));
        Write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        Write(VIRTIO_MMIO_DRIVER_FEATURES, (uint)features);
        Write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        Assert.Equal(ACK | DRIVER | FEATURES_OK, Read(VIRTIO_MMIO_STATUS));

        // Queues; queue 2 does not exist.
        SetupQueue(0, 256, 0x10000, 0x11000, 0x12000);
        SetupQueue(1, 16, 0x20000, 0x21000, 0x22000);
        Write(VIRTIO_MMIO_QUEUE_SEL, 2);
        Assert.Equal(0u, Read(VIRTIO_MMIO_QUEUE_NUM_MAX));

        Write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        Assert.Equal(ACK | DRIVER | FEATURES_OK | DRIVER_OK, Read(VIRTIO_MMIO_STATUS));
        Assert.Equal(1, _device.Activations);
        Assert.Equal(features, _device.NegotiatedFeatures);
        Assert.True(_device.ActiveQueues![0].Ready);
        Assert.True(_device.ActiveQueues[0].EventIndex);
        Assert.Equal(new GuestAddress(0x21000), _device.ActiveQueues[1].AvailableRing);

        // Queue registers are frozen after DRIVER_OK.
        Write(VIRTIO_MMIO_QUEUE_SEL, 0);
        Write(VIRTIO_MMIO_QUEUE_NUM, 8);
        Assert.Equal(256u, Read(VIRTIO_MMIO_QUEUE_NUM));

        // Kick without ioeventfd.
        Write(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        Write(VIRTIO_MMIO_QUEUE_NOTIFY, 7); // no such queue
        Assert.Equal([1], _device.Notified);

        // Used-buffer interrupt, then the driver acknowledges it (vm_interrupt).
        _device.Interrupt!.Signal(VirtioInterruptType.Queue, 0);
        Assert.Equal(1, _irq.Count);
        Assert.Equal(1u, Read(VIRTIO_MMIO_INTERRUPT_STATUS));
        Write(VIRTIO_MMIO_INTERRUPT_ACK, 1);
        Assert.Equal(0u, Read(VIRTIO_MMIO_INTERRUPT_STATUS));

        // Reset stops the device and clears queues.
        Write(VIRTIO_MMIO_STATUS, 0);
        Assert.Equal(1, _device.Resets);
        Assert.Equal(0u, Read(VIRTIO_MMIO_STATUS));
        Write(VIRTIO_MMIO_QUEUE_SEL, 0);
        Assert.Equal(0u, Read(VIRTIO_MMIO_QUEUE_READY));
    }

    [Fact]
    public void FeaturesOk_RefusedForUnofferedFeatureOrMissingVersion1()
    {
        NegotiateFeatures(VirtioFeatures.VERSION_1 | (1UL << 5));
        Assert.Equal(ACK | DRIVER, Read(VIRTIO_MMIO_STATUS));
        NegotiateFeatures(1);
        Assert.Equal(ACK | DRIVER, Read(VIRTIO_MMIO_STATUS));
        NegotiateFeatures(VirtioFeatures.VERSION_1);
        Assert.Equal(ACK | DRIVER | FEATURES_OK, Read(VIRTIO_MMIO_STATUS));
    }

    [Fact]
    public void DriverOk_WithoutFeaturesOk_DoesNotActivate()
    {
        Write(VIRTIO_MMIO_STATUS, ACK | DRIVER);
        Write(VIRTIO_MMIO_STATUS, ACK | DRIVER | DRIVER_OK);
        Assert.Equal(0, _device.Activations);
        Assert.Equal(ACK | DRIVER, Read(VIRTIO_MMIO_STATUS));
    }

    [Fact]
    public void InvalidQueue_AtDriverOk_SetsNeedsResetAndSignalsConfig()
    {
        NegotiateFeatures(VirtioFeatures.VERSION_1);
        SetupQueue(0, 256, 0x10008, 0x11000, 0x12000); // descriptor table not 16-aligned
        uint generation = Read(VIRTIO_MMIO_CONFIG_GENERATION);
        Write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        Assert.Equal(0, _device.Activations);
        Assert.NotEqual(0u, Read(VIRTIO_MMIO_STATUS) & NEEDS_RESET);
        Assert.Equal(2u, Read(VIRTIO_MMIO_INTERRUPT_STATUS));
        Assert.Equal(1, _irq.Count);
        Assert.NotEqual(generation, Read(VIRTIO_MMIO_CONFIG_GENERATION));
        Write(VIRTIO_MMIO_STATUS, 0);
        Assert.Equal(0u, Read(VIRTIO_MMIO_STATUS));
        Assert.Equal(0, _device.Resets); // never activated
    }

    [Fact]
    public void DeviceRefusingActivation_SetsNeedsReset()
    {
        _device.ActivateResult = false;
        NegotiateFeatures(VirtioFeatures.VERSION_1);
        SetupQueue(0, 256, 0x10000, 0x11000, 0x12000);
        Write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        Assert.NotEqual(0u, Read(VIRTIO_MMIO_STATUS) & NEEDS_RESET);
    }

    [Fact]
    public void QueueRegisters_IgnoredBeforeFeaturesOk()
    {
        Write(VIRTIO_MMIO_STATUS, ACK | DRIVER);
        Write(VIRTIO_MMIO_QUEUE_SEL, 0);
        Write(VIRTIO_MMIO_QUEUE_NUM, 8);
        Write(VIRTIO_MMIO_QUEUE_READY, 1);
        Assert.Equal(256u, Read(VIRTIO_MMIO_QUEUE_NUM));
        Assert.Equal(0u, Read(VIRTIO_MMIO_QUEUE_READY));
    }

    [Fact]
    public void ConfigSpace_AnyWidth_AndGenerationChangesOnConfigSignal()
    {
        Span<byte> b = stackalloc byte[2];
        _mmio.Read(VIRTIO_MMIO_CONFIG + 2, b);
        Assert.Equal(new byte[] { 3, 4 }, b.ToArray());
        _mmio.Write(VIRTIO_MMIO_CONFIG + 7, [0xAA]);
        Assert.Equal(0xAA, _device.ConfigSpace[7]);
        uint generation = Read(VIRTIO_MMIO_CONFIG_GENERATION);
        _mmio.Signal(VirtioInterruptType.Config, 0);
        Assert.Equal(generation + 1, Read(VIRTIO_MMIO_CONFIG_GENERATION));
        Assert.Equal(2u, Read(VIRTIO_MMIO_INTERRUPT_STATUS));
    }

    [Fact]
    public void NarrowOrMisalignedRegisterAccess_IsIgnored()
    {
        Span<byte> b = stackalloc byte[2];
        b.Fill(0xEE);
        _mmio.Read(VIRTIO_MMIO_MAGIC_VALUE, b);
        Assert.Equal(0, b[0] | b[1]);
        _mmio.Write(VIRTIO_MMIO_STATUS, [1]);
        Assert.Equal(0u, Read(VIRTIO_MMIO_STATUS));
        Assert.Equal(2u, Read(VIRTIO_MMIO_VERSION)); // aligned reads still work
        Span<byte> four = stackalloc byte[4];
        _mmio.Read(VIRTIO_MMIO_VERSION + 2, four);
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(four));
        Assert.Equal(uint.MaxValue, Read(VIRTIO_MMIO_SHM_LEN_LOW));
    }

    [Fact]
    public void Constructor_RequiresVersion1()
    {
        var legacy = new FakeVirtioDevice { Offered = 1 };
        Assert.Throws<ArgumentException>(() => TestTransports.Mmio(legacy, _memory, _irq));
    }

    [Fact]
    public void OnTheMmioBus()
    {
        var bus = new Bus();
        bus.Insert(_mmio, 0xD000_0000, VirtioMmioTransport.RegionSize);
        Span<byte> b = stackalloc byte[4];
        Assert.True(bus.TryRead(0xD000_0000, b));
        Assert.Equal(0x74726976u, BinaryPrimitives.ReadUInt32LittleEndian(b));
        Assert.True(bus.TryRead(0xD000_0FFC, b));
        Assert.False(bus.TryRead(0xD000_0FFE, b));
    }
}
