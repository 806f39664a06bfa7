using System.Text;

namespace KvmSharp.Devices.Tests;

public class Serial8250Tests
{
    // Register offsets and bits as Linux include/uapi/linux/serial_reg.h names them.
    private const int UART_RX = 0, UART_TX = 0, UART_DLL = 0, UART_IER = 1, UART_DLM = 1, UART_IIR = 2,
        UART_FCR = 2, UART_EFR = 2, UART_LCR = 3, UART_MCR = 4, UART_LSR = 5, UART_MSR = 6, UART_SCR = 7;
    private const byte UART_IER_RDI = 0x01, UART_IER_THRI = 0x02, UART_IER_RLSI = 0x04, UART_IER_MSI = 0x08,
        UART_IER_UUE = 0x40;
    private const byte UART_IIR_NO_INT = 0x01, UART_IIR_ID = 0x0E, UART_IIR_MSI = 0x00, UART_IIR_THRI = 0x02,
        UART_IIR_RDI = 0x04, UART_IIR_RLSI = 0x06, UART_IIR_RX_TIMEOUT = 0x0C, UART_IIR_FIFO_ENABLED = 0xC0,
        UART_IIR_64BYTE_FIFO = 0x20;
    private const byte UART_FCR_ENABLE_FIFO = 0x01, UART_FCR_CLEAR_RCVR = 0x02, UART_FCR_CLEAR_XMIT = 0x04,
        UART_FCR7_64BYTE = 0x20, UART_FCR_TRIGGER_14 = 0xC0;
    private const byte UART_LCR_DLAB = 0x80, UART_LCR_WLEN8 = 0x03, UART_LCR_CONF_MODE_A = 0x80,
        UART_LCR_CONF_MODE_B = 0xBF;
    private const byte UART_MCR_DTR = 0x01, UART_MCR_RTS = 0x02, UART_MCR_OUT1 = 0x04, UART_MCR_OUT2 = 0x08,
        UART_MCR_LOOP = 0x10;
    private const byte UART_LSR_DR = 0x01, UART_LSR_OE = 0x02, UART_LSR_THRE = 0x20, UART_LSR_TEMT = 0x40;
    private const byte UART_MSR_DCD = 0x80, UART_MSR_RI = 0x40, UART_MSR_DSR = 0x20, UART_MSR_CTS = 0x10,
        UART_MSR_STATUS_BITS = 0xF0, UART_MSR_DELTA_BITS = 0x0F, UART_MSR_TERI = 0x04;

#pragma warning disable CA1001 // test helper; MemoryStream holds no native resource
    private sealed class Uart
    {
        public readonly CountingLine Irq = new();
        public readonly MemoryStream Output = new();
        public readonly Serial8250 Device;

        public Uart() => Device = new Serial8250(Irq, Output);

        public byte In(int reg)
        {
            Span<byte> b = stackalloc byte[1];
            Device.Read((ulong)reg, b);
            return b[0];
        }

        public void Out(int reg, byte value) => Device.Write((ulong)reg, [value]);

        public string Sent => Encoding.ASCII.GetString(Output.ToArray());
    }
#pragma warning restore CA1001

    [Fact]
    public void ResetState_MatchesDatasheet()
    {
        var u = new Uart();
        Assert.Equal(0, u.In(UART_IER));
        Assert.Equal(UART_IIR_NO_INT, u.In(UART_IIR));
        Assert.Equal(0, u.In(UART_LCR));
        Assert.Equal(0, u.In(UART_MCR));
        Assert.Equal(UART_LSR_THRE | UART_LSR_TEMT, u.In(UART_LSR));
        Assert.Equal(UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS, u.In(UART_MSR));
        Assert.Equal(0, u.Irq.Count);
    }

    /// <summary>
    /// Replays Linux's drivers/tty/serial/8250/8250_port.c autoconfig() and autoconfig_16550a()
    /// (with the 16550A-variant probes) and checks every decision it takes lands on PORT_16550A.
    /// </summary>
    [Fact]
    public void LinuxAutoconfig_DetectsA16550A()
    {
        var u = new Uart();

        // IER test: bits 0-3 must be writable, and reads back what was written.
        byte scratch = u.In(UART_IER);
        u.Out(UART_IER, 0);
        byte scratch2 = (byte)(u.In(UART_IER) & 0x0F);
        u.Out(UART_IER, 0x0F);
        byte scratch3 = (byte)(u.In(UART_IER) & 0x0F);
        u.Out(UART_IER, scratch);
        Assert.Equal(0, scratch2);
        Assert.Equal(0x0F, scratch3);

        byte saveMcr = u.In(UART_MCR);
        byte saveLcr = u.In(UART_LCR);

        // Loopback test: in loopback, OUT2 -> DCD and RTS -> CTS.
        u.Out(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT2 | UART_MCR_RTS);
        byte status1 = (byte)(u.In(UART_MSR) & UART_MSR_STATUS_BITS);
        u.Out(UART_MCR, saveMcr);
        Assert.Equal(UART_MSR_DCD | UART_MSR_CTS, status1);

        // FIFO detection: clear EFR (no-op here), enable FIFOs, IIR bits 7:6 say which UART.
        u.Out(UART_LCR, UART_LCR_CONF_MODE_B);
        u.Out(UART_EFR, 0);
        u.Out(UART_LCR, 0);
        u.Out(UART_FCR, UART_FCR_ENABLE_FIFO);
        Assert.Equal(3, u.In(UART_IIR) >> 6); // 3 -> autoconfig_16550a

        // autoconfig_16550a: no EFR under either configuration mode (IIR reads nonzero).
        u.Out(UART_LCR, UART_LCR_CONF_MODE_A);
        Assert.NotEqual(0, u.In(UART_EFR));
        u.Out(UART_LCR, UART_LCR_CONF_MODE_B);
        Assert.NotEqual(0, u.In(UART_EFR));

        // Not a National Semiconductor SuperIO: EXCR1 (offset 2 with LCR 0xE0) does not follow MCR.LOOP.
        u.Out(UART_LCR, 0);
        byte mcr = u.In(UART_MCR);
        u.Out(UART_LCR, 0xE0);
        byte excr1 = u.In(2);
        if (((excr1 ^ mcr) & UART_MCR_LOOP) == 0)
        {
            u.Out(UART_LCR, 0);
            u.Out(UART_MCR, (byte)(mcr ^ UART_MCR_LOOP));
            u.Out(UART_LCR, 0xE0);
            excr1 = u.In(2);
            u.Out(UART_LCR, 0);
            u.Out(UART_MCR, mcr);
            Assert.Equal(0, (excr1 ^ mcr) & UART_MCR_LOOP);
        }

        // Not a TI16750: IIR bit 5 never follows FCR bit 5.
        u.Out(UART_LCR, 0);
        u.Out(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE);
        status1 = (byte)(u.In(UART_IIR) & (UART_IIR_64BYTE_FIFO | UART_IIR_FIFO_ENABLED));
        u.Out(UART_FCR, UART_FCR_ENABLE_FIFO);
        u.Out(UART_LCR, UART_LCR_CONF_MODE_A);
        u.Out(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE);
        byte status2 = (byte)(u.In(UART_IIR) & (UART_IIR_64BYTE_FIFO | UART_IIR_FIFO_ENABLED));
        u.Out(UART_FCR, UART_FCR_ENABLE_FIFO);
        u.Out(UART_LCR, 0);
        Assert.Equal(UART_IIR_FIFO_ENABLED, status1);
        Assert.Equal(UART_IIR_FIFO_ENABLED, status2);

        // Not an XScale: IER bit 6 (UUE) is not writable.
        byte iersave = u.In(UART_IER);
        u.Out(UART_IER, (byte)(iersave & ~UART_IER_UUE));
        Assert.Equal(0, u.In(UART_IER) & UART_IER_UUE);
        u.Out(UART_IER, (byte)(iersave | UART_IER_UUE));
        Assert.Equal(0, u.In(UART_IER) & UART_IER_UUE);
        u.Out(UART_IER, iersave);

        u.Out(UART_LCR, saveLcr);
        u.Out(UART_MCR, saveMcr);
        Assert.Equal(saveMcr, u.In(UART_MCR));
        Assert.Equal(saveLcr, u.In(UART_LCR));
        Assert.Equal("", u.Sent); // the probe transmits nothing
    }

    [Fact]
    public void ScratchRegister_HoldsAnyValue()
    {
        // autoconfig_8250's 8250-vs-16450 test.
        var u = new Uart();
        u.Out(UART_SCR, 0xA5);
        Assert.Equal(0xA5, u.In(UART_SCR));
        u.Out(UART_SCR, 0x5A);
        Assert.Equal(0x5A, u.In(UART_SCR));
    }

    /// <summary>serial8250_do_startup: FIFO clear, register clear, THRE re-assertion and TXEN tests.</summary>
    [Fact]
    public void LinuxStartup_FindsNoThreOrTxenBug()
    {
        var u = new Uart();
        // serial8250_clear_fifos
        u.Out(UART_FCR, UART_FCR_ENABLE_FIFO);
        u.Out(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT);
        u.Out(UART_FCR, 0);
        u.In(UART_LSR);
        u.In(UART_RX);
        u.In(UART_IIR);
        u.In(UART_MSR);
        Assert.NotEqual(0xFF, u.In(UART_LSR));

        // UART_BUG_THRE test: THRE must be re-asserted when THRI is enabled again.
        u.Out(UART_IER, UART_IER_THRI);
        byte iir1 = u.In(UART_IIR);
        u.Out(UART_IER, 0);
        u.Out(UART_IER, UART_IER_THRI);
        byte iir = u.In(UART_IIR);
        u.Out(UART_IER, 0);
        Assert.Equal(UART_IIR_THRI, iir1);
        Assert.Equal(UART_IIR_THRI, iir);

        // UART_BUG_TXEN test.
        u.Out(UART_LCR, UART_LCR_WLEN8);
        u.Out(UART_MCR, UART_MCR_OUT2 | UART_MCR_RTS | UART_MCR_DTR);
        u.Out(UART_IER, UART_IER_THRI);
        byte lsr = u.In(UART_LSR);
        iir = u.In(UART_IIR);
        u.Out(UART_IER, 0);
        Assert.False((lsr & UART_LSR_TEMT) != 0 && (iir & UART_IIR_NO_INT) != 0);
    }

    [Fact]
    public void Transmit_StringReachesOutput()
    {
        var u = new Uart();
        u.Out(UART_LCR, UART_LCR_WLEN8);
        foreach (char c in "Linux version 6.1\r\n")
        {
            Assert.NotEqual(0, u.In(UART_LSR) & UART_LSR_THRE);
            u.Out(UART_TX, (byte)c);
        }
        Assert.Equal("Linux version 6.1\r\n", u.Sent);
        Assert.Equal(19, u.Device.TransmittedBytes);
        Assert.Equal(0, u.Irq.Count); // no interrupts enabled
    }

    [Fact]
    public void Transmit_OutputIsFlushedPerByte()
    {
        var irq = new CountingLine();
        var output = new FlushCountingStream();
        var uart = new Serial8250(irq, output);
        uart.Write(UART_TX, [(byte)'a']);
        uart.Write(UART_TX, [(byte)'b']);
        Assert.Equal(2, output.Flushes);
        Assert.Equal("ab", Encoding.ASCII.GetString(output.ToArray()));
    }

    [Fact]
    public void Transmit_OutputErrorLosesTheByteButNotTheGuest()
    {
        var irq = new CountingLine();
        var uart = new Serial8250(irq, new BrokenStream());
        uart.Write(UART_IER, [UART_IER_THRI]);
        uart.Write(UART_TX, [(byte)'x']);
        Assert.Equal(1, uart.LostBytes);
        Span<byte> b = stackalloc byte[1];
        uart.Read(UART_IIR, b);
        Assert.Equal(UART_IIR_THRI, b[0]); // THR still empties
    }

    [Fact]
    public void Thre_RaisedWhenEtbeiEnabledWithEmptyThr()
    {
        var u = new Uart();
        u.Out(UART_IER, UART_IER_THRI);
        Assert.Equal(1, u.Irq.Count);
        Assert.Equal(UART_IIR_THRI, u.In(UART_IIR));
        // The IIR read acknowledged it.
        Assert.Equal(UART_IIR_NO_INT, u.In(UART_IIR));
        Assert.Equal(1, u.Irq.Count);
        // Writing IER again with THRI already set is not a rising edge.
        u.Out(UART_IER, UART_IER_THRI);
        Assert.Equal(UART_IIR_NO_INT, u.In(UART_IIR));
        // Toggling it off and on re-asserts (console write restores IER like this).
        u.Out(UART_IER, 0);
        u.Out(UART_IER, UART_IER_THRI | UART_IER_RDI);
        Assert.Equal(2, u.Irq.Count);
        Assert.Equal(UART_IIR_THRI, u.In(UART_IIR));
    }

    [Fact]
    public void Thre_RaisedAfterEveryTransmittedByte_OneEdgePerAcknowledgement()
    {
        var u = new Uart();
        u.Out(UART_IER, UART_IER_THRI);
        Assert.Equal(UART_IIR_THRI, u.In(UART_IIR)); // handler acknowledges
        Assert.Equal(1, u.Irq.Count);

        // serial8250_tx_chars: up to 16 bytes per interrupt without looking at LSR.
        for (int i = 0; i < 16; i++)
            u.Out(UART_TX, (byte)('a' + i));
        Assert.Equal(2, u.Irq.Count); // the level rose once: one edge, not 16
        Assert.Equal(UART_IIR_THRI, u.In(UART_IIR));

        u.Out(UART_TX, (byte)'z');
        Assert.Equal(3, u.Irq.Count);

        // __stop_tx: THRI off, the pending THRE is masked; nothing more.
        u.Out(UART_IER, 0);
        Assert.Equal(UART_IIR_NO_INT, u.In(UART_IIR));
        Assert.Equal(3, u.Irq.Count);
        Assert.Equal("abcdefghijklmnopz", u.Sent);
    }

    [Fact]
    public void Thre_ClearedByThrWriteWhileDisabled_ThenReassertedOnEnable()
    {
        var u = new Uart();
        u.Out(UART_TX, (byte)'q'); // THRI disabled: no interrupt
        Assert.Equal(0, u.Irq.Count);
        u.Out(UART_IER, UART_IER_THRI);
        Assert.Equal(1, u.Irq.Count);
        Assert.Equal(UART_IIR_THRI, u.In(UART_IIR));
    }

    [Fact]
    public void Thre_AcknowledgedByIirRead_RetriggersWhenAnotherInterruptRemains()
    {
        var u = new Uart();
        // Make a modem status change pending (loopback, DTR -> DSR) with MSI enabled.
        u.Out(UART_MCR, UART_MCR_LOOP);
        u.In(UART_MSR); // clear the deltas entering loopback produced
        u.Out(UART_IER, UART_IER_MSI | UART_IER_THRI);
        Assert.Equal(1, u.Irq.Count);
        u.Out(UART_MCR, UART_MCR_LOOP | UART_MCR_DTR);
        Assert.Equal(1, u.Irq.Count); // already pending: no new edge

        // IIR reports THRE (higher priority) and clears it; MSI is still pending, so a level
        // line would still be high after the guest's EOI: another edge.
        Assert.Equal(UART_IIR_THRI, u.In(UART_IIR));
        Assert.Equal(2, u.Irq.Count);
        Assert.Equal(UART_IIR_MSI, u.In(UART_IIR));
        Assert.Equal(2, u.Irq.Count); // reading IIR does not clear MSI
        byte msr = u.In(UART_MSR);
        Assert.Equal(UART_MSR_DSR | 0x02 /* DDSR */, msr);
        Assert.Equal(UART_IIR_NO_INT, u.In(UART_IIR));
        Assert.Equal(2, u.Irq.Count);
    }

    [Fact]
    public void Receive_WithInterruptEnabled_RaisesLineAndSetsDataReady()
    {
        var u = new Uart();
        u.Out(UART_IER, UART_IER_RDI);
        Assert.Equal(0, u.Irq.Count);
        Assert.Equal(3, u.Device.EnqueueInput("ls\n"u8));
        Assert.Equal(1, u.Irq.Count);
        Assert.NotEqual(0, u.In(UART_LSR) & UART_LSR_DR);
        Assert.Equal(UART_IIR_RDI, u.In(UART_IIR));

        // More input while still pending: no extra edge.
        Assert.Equal(1, u.Device.EnqueueInput("x"u8));
        Assert.Equal(1, u.Irq.Count);

        var got = new List<byte>();
        while ((u.In(UART_LSR) & UART_LSR_DR) != 0)
            got.Add(u.In(UART_RX));
        Assert.Equal("ls\nx"u8.ToArray(), got.ToArray());
        Assert.Equal(UART_IIR_NO_INT, u.In(UART_IIR));

        // Drained: the next input is a new rising edge.
        u.Device.EnqueueInput("y"u8);
        Assert.Equal(2, u.Irq.Count);
    }

    [Fact]
    public void Receive_WithInterruptDisabled_OnlySetsDataReady_ThenEnablingRaises()
    {
        var u = new Uart();
        u.Device.EnqueueInput("a"u8);
        Assert.Equal(0, u.Irq.Count);
        Assert.Equal(UART_LSR_DR | UART_LSR_THRE | UART_LSR_TEMT, u.In(UART_LSR));
        u.Out(UART_IER, UART_IER_RDI);
        Assert.Equal(1, u.Irq.Count);
        Assert.Equal((byte)'a', u.In(UART_RX));
    }

    [Fact]
    public void Receive_HasPriorityOverThre()
    {
        var u = new Uart();
        u.Out(UART_IER, UART_IER_RDI | UART_IER_THRI);
        u.Device.EnqueueInput("k"u8);
        Assert.Equal(UART_IIR_RDI, u.In(UART_IIR));
        Assert.Equal(UART_IIR_RDI, u.In(UART_IIR)); // not acknowledged by IIR read
        u.In(UART_RX);
        Assert.Equal(UART_IIR_THRI, u.In(UART_IIR)); // THRE was pending underneath all along
        Assert.Equal(UART_IIR_NO_INT, u.In(UART_IIR));
    }

    [Fact]
    public void Receive_FifoMode_ReportsTimeoutBelowTriggerLevelAndDataAtIt()
    {
        var u = new Uart();
        u.Out(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT | UART_FCR_TRIGGER_14); // 0xC7
        u.Out(UART_IER, UART_IER_RDI);
        u.Device.EnqueueInput("abc"u8);
        Assert.Equal(UART_IIR_FIFO_ENABLED | UART_IIR_RX_TIMEOUT, u.In(UART_IIR));
        u.Device.EnqueueInput("defghijklmn"u8); // 14 now
        Assert.Equal(UART_IIR_FIFO_ENABLED | UART_IIR_RDI, u.In(UART_IIR));
        Assert.Equal(1, u.Irq.Count);
    }

    [Fact]
    public void Fifo_ClearReceiverDropsOnlyWhatTheGuestCanSee()
    {
        var u = new Uart();
        u.Out(UART_FCR, UART_FCR_ENABLE_FIFO);
        var input = Enumerable.Range(0, 20).Select(i => (byte)i).ToArray();
        u.Device.EnqueueInput(input);
        u.Out(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR);
        Assert.Equal(16, u.In(UART_RX)); // bytes 0-15 were in the FIFO
        Assert.Equal(UART_IIR_NO_INT | UART_IIR_FIFO_ENABLED, u.In(UART_IIR));
        // Disabling the FIFOs resets them too.
        u.Out(UART_FCR, 0);
        Assert.Equal(UART_IIR_NO_INT, u.In(UART_IIR));
        Assert.Equal(0, u.In(UART_LSR) & UART_LSR_DR);
    }

    [Fact]
    public void InputBuffer_IsBounded_AndReportsAcceptedCount()
    {
        var u = new Uart();
        var big = new byte[Serial8250.InputBufferSize + 100];
        for (int i = 0; i < big.Length; i++)
            big[i] = (byte)i;
        Assert.Equal(Serial8250.InputBufferSize, u.Device.EnqueueInput(big));
        Assert.Equal(0, u.Device.InputSpace);
        Assert.Equal(0, u.Device.EnqueueInput("more"u8));
        Assert.Equal(0, u.In(UART_RX));
        Assert.Equal(1, u.Device.InputSpace);
        Assert.Equal(1, u.Device.EnqueueInput(big.AsSpan(Serial8250.InputBufferSize)));
        // Order is preserved across the ring's wrap-around.
        for (int i = 1; i < Serial8250.InputBufferSize; i++)
            Assert.Equal((byte)i, u.In(UART_RX));
        Assert.Equal(unchecked((byte)Serial8250.InputBufferSize), u.In(UART_RX));
        Assert.Equal(0, u.In(UART_LSR) & UART_LSR_DR);
    }

    [Fact]
    public void Loopback_TransmitGoesToReceiver_AndHostInputIsRefused()
    {
        var u = new Uart();
        u.Out(UART_MCR, UART_MCR_LOOP);
        u.Out(UART_IER, UART_IER_RDI);
        Assert.Equal(0, u.Device.EnqueueInput("host"u8));
        Assert.Equal(0, u.Device.InputSpace);
        u.Out(UART_TX, 0x5A);
        Assert.Equal(1, u.Irq.Count);
        Assert.NotEqual(0, u.In(UART_LSR) & UART_LSR_DR);
        Assert.Equal(0x5A, u.In(UART_RX));
        Assert.Equal("", u.Sent);
        // 16450 mode holds one byte: a second one overruns.
        u.Out(UART_TX, 1);
        u.Out(UART_TX, 2);
        Assert.Equal(UART_LSR_DR | UART_LSR_OE | UART_LSR_THRE | UART_LSR_TEMT, u.In(UART_LSR));
        Assert.Equal(UART_LSR_DR | UART_LSR_THRE | UART_LSR_TEMT, u.In(UART_LSR)); // OE cleared by read
        u.Out(UART_MCR, 0);
        Assert.Equal(Serial8250.InputBufferSize - 1, u.Device.InputSpace);
    }

    [Fact]
    public void Loopback_LineStatusErrorInterruptHasTopPriority()
    {
        var u = new Uart();
        u.Out(UART_MCR, UART_MCR_LOOP);
        u.Out(UART_IER, UART_IER_RDI | UART_IER_RLSI);
        u.Out(UART_TX, 1);
        u.Out(UART_TX, 2); // overrun
        Assert.Equal(UART_IIR_RLSI, u.In(UART_IIR));
        u.In(UART_LSR);
        Assert.Equal(UART_IIR_RDI, u.In(UART_IIR));
    }

    [Fact]
    public void Loopback_ModemOutputsDriveModemInputs()
    {
        var u = new Uart();
        u.Out(UART_MCR, UART_MCR_LOOP | UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT1 | UART_MCR_OUT2);
        Assert.Equal(UART_MSR_DCD | UART_MSR_RI | UART_MSR_DSR | UART_MSR_CTS,
            u.In(UART_MSR) & UART_MSR_STATUS_BITS);
        u.Out(UART_MCR, UART_MCR_LOOP);
        byte msr = u.In(UART_MSR);
        Assert.Equal(0, msr & UART_MSR_STATUS_BITS);
        Assert.Equal(UART_MSR_DELTA_BITS, msr & UART_MSR_DELTA_BITS); // all four changed; RI fell
        Assert.Equal(0, u.In(UART_MSR) & UART_MSR_DELTA_BITS);       // cleared by the read
        u.Out(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT1);
        Assert.Equal(0, u.In(UART_MSR) & UART_MSR_TERI);             // RI rising is no TERI
    }

    [Fact]
    public void Dlab_SelectsDivisorLatch()
    {
        var u = new Uart();
        u.Out(UART_IER, UART_IER_RDI);
        u.Out(UART_LCR, UART_LCR_DLAB | UART_LCR_WLEN8);
        Assert.Equal(0x0C, u.In(UART_DLL)); // 9600 baud at reset
        u.Out(UART_DLL, 0x01);              // 115200 baud
        u.Out(UART_DLM, 0x00);
        Assert.Equal(0x01, u.In(UART_DLL));
        Assert.Equal(0x00, u.In(UART_DLM));
        u.Out(UART_LCR, UART_LCR_WLEN8);
        Assert.Equal(UART_IER_RDI, u.In(UART_IER)); // IER untouched by the DLM write
        u.Out(UART_TX, (byte)'!');
        Assert.Equal("!", u.Sent);                 // DLL write did not transmit
        u.Device.EnqueueInput("r"u8);
        u.Out(UART_LCR, UART_LCR_DLAB);
        Assert.Equal(0x01, u.In(UART_RX));          // DLL, not the received byte
        u.Out(UART_LCR, 0);
        Assert.Equal((byte)'r', u.In(UART_RX));
    }

    [Fact]
    public void WideAccess_TouchesConsecutiveRegisters()
    {
        var u = new Uart();
        u.Device.Write(UART_LCR, [0x03, 0x0B]); // LCR, MCR
        Assert.Equal(0x03, u.In(UART_LCR));
        Assert.Equal(0x0B, u.In(UART_MCR));
        Span<byte> b = stackalloc byte[2];
        u.Device.Read(UART_LSR, b);
        Assert.Equal(UART_LSR_THRE | UART_LSR_TEMT, b[0]);
        Assert.Equal(UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS, b[1]);
    }

    [Fact]
    public void ConcurrentInputAndGuestReads_DeliverEveryByteInOrder()
    {
        var u = new Uart();
        u.Out(UART_IER, UART_IER_RDI);
        const int total = 100_000;
        var producer = new Thread(() =>
        {
            Span<byte> chunk = stackalloc byte[37];
            int sent = 0;
            while (sent < total)
            {
                int n = Math.Min(chunk.Length, total - sent);
                for (int i = 0; i < n; i++)
                    chunk[i] = (byte)(sent + i);
                int accepted = u.Device.EnqueueInput(chunk[..n]);
                sent += accepted;
                if (accepted == 0)
                    Thread.Yield();
            }
        });
        producer.Start();
        int received = 0;
        int mismatches = 0;
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (received < total && DateTime.UtcNow < deadline)
        {
            if ((u.In(UART_LSR) & UART_LSR_DR) == 0)
                continue;
            if (u.In(UART_RX) != (byte)received)
                mismatches++;
            received++;
        }
        producer.Join();
        Assert.Equal(total, received);
        Assert.Equal(0, mismatches);
        Assert.True(u.Irq.Count >= 1);
    }

    [Fact]
    public void RegisterAccesses_DoNotAllocate()
    {
        var irq = new CountingLine();
        var uart = new Serial8250(irq, Stream.Null);
        Span<byte> b = stackalloc byte[1];
        ReadOnlySpan<byte> thri = [UART_IER_THRI], off = [0], ch = [(byte)'x'];
        uart.Write(UART_IER, thri);
        uart.Write(UART_TX, ch);
        uart.Read(UART_IIR, b);
        uart.EnqueueInput(ch);
        uart.Read(UART_RX, b);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 1000; i++)
        {
            uart.Write(UART_IER, off);
            uart.Write(UART_IER, thri);
            uart.Write(UART_TX, ch);
            uart.Read(UART_IIR, b);
            uart.Read(UART_LSR, b);
            uart.EnqueueInput(ch);
            uart.Read(UART_RX, b);
        }
        Assert.Equal(before, GC.GetAllocatedBytesForCurrentThread());
    }

    private sealed class FlushCountingStream : MemoryStream
    {
        public int Flushes;

        public override void Flush()
        {
            Flushes++;
            base.Flush();
        }
    }

    private sealed class BrokenStream : Stream
    {
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => 0;
        public override long Position { get => 0; set { } }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new IOException("EPIPE");
    }
}
