using System.Buffers.Binary;
using KvmSharp.Devices.Pci;
using KvmSharp.Devices.Virtio;
using KvmSharp.Memory;

namespace KvmSharp.Devices.Tests.Virtio;

internal sealed class RecordingMsiSink : IMsiSink
{
    public readonly List<(ulong Address, uint Data)> Messages = [];

    public void Deliver(ulong address, uint data)
    {
        lock (Messages)
            Messages.Add((address, data));
    }
}

public sealed class VirtioPciTransportTests : IDisposable
{
    private const ulong Bar0 = 0xE000_0000, Bar2 = 0xE000_4000;
    private const int PCI_COMMAND = 0x04, PCI_STATUS = 0x06, PCI_CAPABILITY_LIST = 0x34;
    private const byte ACK = 1, DRIVER = 2, DRIVER_OK = 4, FEATURES_OK = 8, NEEDS_RESET = 64;
    // struct virtio_pci_common_cfg offsets.
    private const ulong device_feature_select = 0x00, device_feature = 0x04, driver_feature_select = 0x08,
        driver_feature = 0x0C, config_msix_vector = 0x10, num_queues = 0x12, device_status = 0x14,
        config_generation = 0x15, queue_select = 0x16, queue_size = 0x18, queue_msix_vector = 0x1A,
        queue_enable = 0x1C, queue_notify_off = 0x1E, queue_desc = 0x20, queue_driver = 0x28, queue_device = 0x30;

    private readonly GuestMemory _memory = GuestMemory.CreateForTesting([(new GuestAddress(0), 1UL << 20)]);
    private readonly FakeVirtioDevice _device = new();
    private readonly RecordingMsiSink _msi = new();
    private readonly RecordingLevelLine _intx = new();
    private readonly Bus _mmio = new();
    private readonly Bus _pio = new();
    private readonly PciRoot _root;
    private readonly VirtioPciTransport _pci;
    private readonly int _slot;

    public VirtioPciTransportTests()
    {
        _root = new PciRoot(_mmio, _pio);
        _pci = TestTransports.Pci(_device, _memory, _msi, _intx, Bar0, Bar2);
        _slot = _root.AddDevice(_pci);
        CfgWrite(PCI_COMMAND, 2, 0x0006); // memory decode + bus master (pci_enable_device)
    }

    public void Dispose() => _memory.Dispose();

    private uint CfgRead(int offset, int length)
    {
        Span<byte> b = stackalloc byte[4];
        _root.ConfigRead(0, _slot, 0, offset, b[..length]);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private void CfgWrite(int offset, int length, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _root.ConfigWrite(0, _slot, 0, offset, b[..length]);
    }

    private ulong Rd(ulong address, int length)
    {
        Span<byte> b = stackalloc byte[8];
        b.Clear();
        Assert.True(_mmio.TryRead(address, b[..length]));
        return BinaryPrimitives.ReadUInt64LittleEndian(b);
    }

    private void Wr(ulong address, int length, ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(b, value);
        Assert.True(_mmio.TryWrite(address, b[..length]));
    }

    /// <summary>Linux virtio_pci_modern_dev.c virtio_pci_find_capability: walk the list for vendor caps.</summary>
    private Dictionary<byte, (int Cap, byte Bar, uint Offset, uint Length)> FindCaps()
    {
        var caps = new Dictionary<byte, (int, byte, uint, uint)>();
        Assert.NotEqual(0u, CfgRead(PCI_STATUS, 2) & 0x10);
        int pos = (int)CfgRead(PCI_CAPABILITY_LIST, 1);
        int guard = 0;
        while (pos != 0 && guard++ < 48)
        {
            if (CfgRead(pos, 1) == 0x09)
            {
                byte type = (byte)CfgRead(pos + 3, 1);
                caps.TryAdd(type, (pos, (byte)CfgRead(pos + 4, 1), CfgRead(pos + 8, 4), CfgRead(pos + 12, 4)));
            }
            else if (CfgRead(pos, 1) == 0x11)
            {
                caps.TryAdd(0x11, (pos, 0, 0, 0));
            }
            pos = (int)CfgRead(pos + 1, 1);
        }
        return caps;
    }

    private void BringUp(bool msix)
    {
        var caps = FindCaps();
        ulong common = Bar0 + caps[1].Offset;
        Wr(common + device_status, 1, 0);
        Wr(common + device_status, 1, ACK);
        Wr(common + device_status, 1, ACK | DRIVER);
        Wr(common + device_feature_select, 4, 1);
        ulong features = Rd(common + device_feature, 4) << 32;
        Wr(common + device_feature_select, 4, 0);
        features |= Rd(common + device_feature, 4);
        Wr(common + driver_feature_select, 4, 0);
        Wr(common + driver_feature, 4, (uint)features);
        Wr(common + driver_feature_select, 4, 1);
        Wr(common + driver_feature, 4, features >> 32);
        Wr(common + device_status, 1, ACK | DRIVER | FEATURES_OK);
        Assert.Equal((ulong)(ACK | DRIVER | FEATURES_OK), Rd(common + device_status, 1));

        if (msix)
        {
            int cap = caps[0x11].Cap;
            CfgWrite(cap + 2, 2, CfgRead(cap + 2, 2) | 0x8000); // MSI-X enable
            Wr(common + config_msix_vector, 2, 0);
            Assert.Equal(0UL, Rd(common + config_msix_vector, 2));
        }
        Assert.Equal(2UL, Rd(common + num_queues, 2));
        // vp_modern setup_vq for queue 0 and 1.
        for (ushort q = 0; q < 2; q++)
        {
            Wr(common + queue_select, 2, q);
            ulong size = Rd(common + queue_size, 2);
            Assert.Equal(q == 0 ? 256UL : 16UL, size);
            Assert.Equal(0UL, Rd(common + queue_enable, 2));
            Assert.Equal(q, (ushort)Rd(common + queue_notify_off, 2));
            if (msix)
            {
                Wr(common + queue_msix_vector, 2, (ulong)q + 1);
                Assert.Equal((ulong)q + 1, Rd(common + queue_msix_vector, 2));
            }
            ulong baseAddr = 0x10000UL * (ulong)(q + 1);
            // vp_iowrite64_twopart: low then high.
            Wr(common + queue_desc, 4, baseAddr); Wr(common + queue_desc + 4, 4, 0);
            Wr(common + queue_driver, 4, baseAddr + 0x1000); Wr(common + queue_driver + 4, 4, 0);
            Wr(common + queue_device, 4, baseAddr + 0x2000); Wr(common + queue_device + 4, 4, 0);
            Wr(common + queue_enable, 2, 1);
            Assert.Equal(1UL, Rd(common + queue_enable, 2));
        }
        Wr(common + device_status, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    [Fact]
    public void Identity_IsModernVirtioPci()
    {
        Assert.Equal(0x1AF4u, CfgRead(0, 2));
        Assert.Equal(0x1040u + VirtioDeviceType.Entropy, CfgRead(2, 2));
        Assert.True(CfgRead(8, 1) >= 1); // revision: non-transitional
        Assert.Equal(0x1AF4u, CfgRead(0x2c, 2));
        Assert.Equal(1u, CfgRead(0x3d, 1)); // INTA#
    }

    [Fact]
    public void Capabilities_DescribeEveryStructure()
    {
        var caps = FindCaps();
        Assert.Equal((byte)0, caps[1].Bar);
        Assert.True(caps[1].Length >= 0x38);
        Assert.Equal((byte)0, caps[2].Bar);
        Assert.Equal(4u, CfgRead(caps[2].Cap + 16, 4)); // notify_off_multiplier
        Assert.True(caps[2].Length >= 2 * 4);
        Assert.Equal(1u, caps[3].Length);
        Assert.True(caps[4].Length > 0);
        Assert.True(caps.ContainsKey(5));   // VIRTIO_PCI_CAP_PCI_CFG is mandatory
        Assert.True(caps.ContainsKey(0x11));
        int msix = caps[0x11].Cap;
        Assert.Equal(2u, CfgRead(msix + 2, 2) & 0x7FF); // 3 vectors: N-1
        Assert.Equal(2u, CfgRead(msix + 4, 4) & 7);     // table in BAR 2
        // cap_len covers the structure.
        Assert.Equal(20u, CfgRead(caps[2].Cap + 2, 1));
        Assert.Equal(16u, CfgRead(caps[1].Cap + 2, 1));
    }

    [Fact]
    public void BringUp_WithMsix_ActivatesAndDeliversQueueInterruptsToTheirVectors()
    {
        BringUp(msix: true);
        Assert.Equal(1, _device.Activations);
        Assert.True(_device.ActiveQueues![1].Ready);
        Assert.Equal(new GuestAddress(0x21000), _device.ActiveQueues[1].AvailableRing);

        // Program vector 2 (queue 1) and unmask it.
        ulong entry = Bar2 + 2 * 16;
        Wr(entry + 0, 4, 0xFEE0_0000);
        Wr(entry + 4, 4, 0);
        Wr(entry + 8, 4, 0x4041);
        Assert.Equal(1UL, Rd(entry + 12, 4)); // masked at reset
        Wr(entry + 12, 4, 0);
        _device.Interrupt!.Signal(VirtioInterruptType.Queue, 1);
        Assert.Equal([(0xFEE0_0000UL, 0x4041u)], _msi.Messages);
        Assert.False(_intx.Asserted);
    }

    [Fact]
    public void MaskedVector_SetsPendingBit_AndFiresOnUnmask()
    {
        BringUp(msix: true);
        ulong entry = Bar2 + 1 * 16;
        Wr(entry + 0, 4, 0xFEE0_1000);
        Wr(entry + 8, 4, 0x31);
        _device.Interrupt!.Signal(VirtioInterruptType.Queue, 0); // vector 1, still masked
        Assert.Empty(_msi.Messages);
        Assert.Equal(0b10UL, Rd(Bar2 + MsixTable.PbaOffset, 8));
        Wr(entry + 12, 4, 0); // unmask
        Assert.Equal([(0xFEE0_1000UL, 0x31u)], _msi.Messages);
        Assert.Equal(0UL, Rd(Bar2 + MsixTable.PbaOffset, 8));
    }

    [Fact]
    public void FunctionMask_HoldsEveryVector()
    {
        BringUp(msix: true);
        int cap = FindCaps()[0x11].Cap;
        Wr(Bar2 + 16 + 8, 4, 0x55);
        Wr(Bar2 + 16 + 12, 4, 0);
        CfgWrite(cap + 2, 2, 0xC000); // enable + function mask
        _device.Interrupt!.Signal(VirtioInterruptType.Queue, 0);
        Assert.Empty(_msi.Messages);
        CfgWrite(cap + 2, 2, 0x8000);
        Assert.Single(_msi.Messages);
    }

    [Fact]
    public void WithoutMsix_IntxIsALevelHeldWhileIsrIsSet()
    {
        BringUp(msix: false);
        var caps = FindCaps();
        ulong isr = Bar0 + caps[3].Offset;
        Assert.False(_intx.Asserted);
        _device.Interrupt!.Signal(VirtioInterruptType.Queue, 0);
        Assert.True(_intx.Asserted);
        _device.Interrupt.Signal(VirtioInterruptType.Queue, 1); // still high: no change
        Assert.Equal(1, _intx.Changes);
        Assert.Equal(1UL, Rd(isr, 1));
        Assert.False(_intx.Asserted); // reading ISR clears it and drops the line
        Assert.Equal(0UL, Rd(isr, 1));

        ulong generation = Rd(Bar0 + caps[1].Offset + config_generation, 1);
        _device.Interrupt.Signal(VirtioInterruptType.Config, 0);
        Assert.True(_intx.Asserted);
        Assert.Equal(2UL, Rd(isr, 1));
        Assert.NotEqual(generation, Rd(Bar0 + caps[1].Offset + config_generation, 1));
        Assert.Empty(_msi.Messages);
    }

    [Fact]
    public void IntxDisableBit_AndMsixEnable_DropThePendingLevel()
    {
        BringUp(msix: false);
        _device.Interrupt!.Signal(VirtioInterruptType.Queue, 0);
        Assert.True(_intx.Asserted);
        CfgWrite(PCI_COMMAND, 2, 0x0406); // + Interrupt Disable
        Assert.False(_intx.Asserted);
        CfgWrite(PCI_COMMAND, 2, 0x0006);
        Assert.True(_intx.Asserted);      // ISR still set: the level comes back
        int cap = FindCaps()[0x11].Cap;
        CfgWrite(cap + 2, 2, 0x8000);     // MSI-X on: INTx is not used
        Assert.False(_intx.Asserted);
    }

    [Fact]
    public void VectorBeyondTable_ReadsBackAsNoVector()
    {
        var caps = FindCaps();
        ulong common = Bar0 + caps[1].Offset;
        Wr(common + config_msix_vector, 2, 7);
        Assert.Equal(0xFFFFUL, Rd(common + config_msix_vector, 2));
        Wr(common + queue_select, 2, 5); // no such queue
        Assert.Equal(0UL, Rd(common + queue_size, 2));
    }

    [Fact]
    public void NotifyWrites_ReachTheDevice()
    {
        BringUp(msix: true);
        var caps = FindCaps();
        ulong notifyBase = Bar0 + caps[2].Offset;
        Wr(notifyBase + 1 * VirtioPciTransport.NotifyOffMultiplier, 2, 1); // Linux iowrite16(index)
        Wr(notifyBase, 2, 0);
        Assert.Equal([1, 0], _device.Notified);
    }

    [Fact]
    public void DeviceConfig_IsReachableThroughBar0()
    {
        var caps = FindCaps();
        Assert.Equal(0x0403UL, Rd(Bar0 + caps[4].Offset + 2, 2));
        Wr(Bar0 + caps[4].Offset + 7, 1, 0x99);
        Assert.Equal(0x99, _device.ConfigSpace[7]);
    }

    [Fact]
    public void PciCfgWindow_ReadsAndWritesBar0()
    {
        var caps = FindCaps();
        int cap = caps[5].Cap;
        // Write device_status = ACK through the window.
        CfgWrite(cap + 4, 1, 0);                     // bar
        CfgWrite(cap + 8, 4, (uint)device_status);   // offset
        CfgWrite(cap + 12, 4, 1);                    // length
        CfgWrite(cap + 16, 1, ACK);                  // pci_cfg_data
        Assert.Equal(ACK, _pci.DeviceStatus);
        // Read num_queues through it.
        CfgWrite(cap + 8, 4, (uint)num_queues);
        CfgWrite(cap + 12, 4, 2);
        Assert.Equal(2u, CfgRead(cap + 16, 2));
    }

    [Fact]
    public void InvalidQueueAtDriverOk_SetsNeedsReset()
    {
        var caps = FindCaps();
        ulong common = Bar0 + caps[1].Offset;
        Wr(common + device_status, 1, ACK | DRIVER);
        Wr(common + driver_feature_select, 4, 1);
        Wr(common + driver_feature, 4, 1); // VERSION_1
        Wr(common + device_status, 1, ACK | DRIVER | FEATURES_OK);
        Wr(common + queue_select, 2, 0);
        Wr(common + queue_size, 2, 100); // not a power of two
        Wr(common + queue_desc, 8, 0x10000);
        Wr(common + queue_driver, 8, 0x11000);
        Wr(common + queue_device, 8, 0x12000);
        Wr(common + queue_enable, 2, 1);
        Wr(common + device_status, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        Assert.NotEqual(0UL, Rd(common + device_status, 1) & NEEDS_RESET);
        Assert.Equal(0, _device.Activations);
        Assert.True(_intx.Asserted); // configuration change notification (MSI-X off)
    }

    /// <summary>A running device that stopped on an impossible ring shows DEVICE_NEEDS_RESET in
    /// device_status (virtio 1.2 §2.1.2) until the driver resets it; the driver writing the
    /// status back, with or without the bit, changes nothing.</summary>
    [Fact]
    public void BrokenDevice_ShowsNeedsReset_UntilReset()
    {
        var caps = FindCaps();
        ulong common = Bar0 + caps[1].Offset;
        _device.Broken = true; // not running yet: nothing to report
        Wr(common + device_status, 1, ACK);
        Assert.Equal((ulong)ACK, Rd(common + device_status, 1));
        Wr(common + device_status, 1, 0);
        _device.Broken = false;

        BringUp(msix: false);
        const byte running = ACK | DRIVER | FEATURES_OK | DRIVER_OK;
        Assert.Equal((ulong)running, Rd(common + device_status, 1));
        _device.Broken = true;
        Assert.Equal((ulong)(running | NEEDS_RESET), Rd(common + device_status, 1));
        Wr(common + device_status, 1, running);
        Assert.Equal((ulong)(running | NEEDS_RESET), Rd(common + device_status, 1));
        Wr(common + device_status, 1, running | NEEDS_RESET);
        Assert.Equal((ulong)(running | NEEDS_RESET), Rd(common + device_status, 1));
        Wr(common + device_status, 1, 0);
        Assert.Equal(1, _device.Resets);
        Assert.Equal(0UL, Rd(common + device_status, 1));
    }

    [Fact]
    public void Reset_ClearsVectorsAndQueues()
    {
        BringUp(msix: true);
        var caps = FindCaps();
        ulong common = Bar0 + caps[1].Offset;
        Wr(common + device_status, 1, 0);
        Assert.Equal(1, _device.Resets);
        Assert.Equal(0xFFFFUL, Rd(common + config_msix_vector, 2));
        Wr(common + queue_select, 2, 0);
        Assert.Equal(0UL, Rd(common + queue_enable, 2));
        Assert.Equal(0xFFFFUL, Rd(common + queue_msix_vector, 2));
    }

    [Fact]
    public void MsixTable_IgnoresOddWidthsAndPbaWrites()
    {
        var sink = new RecordingMsiSink();
        var table = new MsixTable(3, sink);
        Span<byte> b = stackalloc byte[2];
        b.Fill(0xEE);
        table.Read(12, b);
        Assert.Equal(0, b[0] | b[1]);
        table.Write(12, [0, 0]); // 16-bit: ignored, still masked
        Span<byte> d = stackalloc byte[4];
        table.Read(12, d);
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(d));
        table.Write(MsixTable.PbaOffset, [1, 0, 0, 0]);
        table.Read(MsixTable.PbaOffset, d);
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(d));
        Assert.False(table.Trigger(0)); // MSI-X disabled: caller uses INTx
        Assert.Throws<ArgumentOutOfRangeException>(() => new MsixTable(0, sink));
        Assert.Throws<ArgumentOutOfRangeException>(() => new MsixTable(MsixTable.MaxVectors + 1, sink));
    }
}
