using System.Diagnostics;

namespace KvmSharp.Devices;

/// <summary>
/// A 16550A UART (National Semiconductor PC16550D datasheet; register names from it), as found at
/// COM1 (port 0x3f8, 8 registers, ISA IRQ 4). Bytes the guest transmits go to an output stream
/// (the console); bytes from the host are queued with <see cref="EnqueueInput"/>.
/// </summary>
/// <remarks>
/// <para><b>Timing.</b> There is no baud-rate timing: a byte written to THR is transmitted at once,
/// so LSR always reports THRE and TEMT, and a THRE interrupt (when ETBEI is enabled) follows every
/// transmitted byte. The divisor latch is stored and read back but has no effect.</para>
/// <para><b>Receive path.</b> Host input waits in a buffer of <see cref="InputBufferSize"/> bytes.
/// The guest sees its first 16 bytes as the receive FIFO (1 byte, the RBR, when FIFOs are
/// disabled); the rest is backlog the host holds back as if by flow control, so nothing is ever
/// overrun. An FCR "clear receive FIFO" discards only what the guest can see. A receive interrupt
/// is reported as "received data available" when the FIFO holds at least the trigger level and as
/// "character timeout" otherwise (the timeout counts as already elapsed).</para>
/// <para><b>Interrupts on an edge line.</b> The 16550's INTR output is a level: high while IIR
/// reports a pending interrupt. KVM's irqfd (<see cref="IInterruptLine"/>) delivers edges. The
/// device re-computes IIR after every register access and calls <see cref="IInterruptLine.Trigger"/>
/// when the condition goes from "none pending" to "pending" — the rising edge of the level. In
/// addition, when an IIR read acknowledges a THRE interrupt and another interrupt remains
/// pending, it triggers again, because on a level line the still-high output would interrupt
/// again after the guest's EOI. Linux's handler (serial8250_interrupt) re-reads IIR until it reads
/// "no interrupt pending", so every later condition is a fresh rising edge and none is lost.
/// The datasheet gates nothing on MCR.OUT2; PC boards use OUT2 to enable the IRQ driver, and
/// like QEMU and Firecracker this model does not, since every PC driver sets it.</para>
/// <para><b>THRE interrupt.</b> Pending after each transmitted byte, and when IER.ETBEI goes from
/// 0 to 1 (THR is always empty then). Cleared by an IIR read that reports it or by a THR write
/// (PC16550D, "Interrupt Identification Register" table). Linux's probe (serial8250_do_startup,
/// "UART_BUG_THRE" and "UART_BUG_TXEN" tests) and its transmit path rely on the re-assertion on
/// enabling ETBEI.</para>
/// <para><b>Threads.</b> Register accesses (vCPU threads) and <see cref="EnqueueInput"/> (an input
/// thread) serialise on one per-device lock. Output is written and flushed while holding it, so a
/// blocked console stalls the transmitting vCPU, as a real UART without flow control would lose
/// bytes instead. <see cref="IInterruptLine.Trigger"/> is called after the lock is released.</para>
/// </remarks>
public sealed class Serial8250 : IBusDevice
{
    /// <summary>Size of the host-to-guest input buffer in bytes.</summary>
    public const int InputBufferSize = 4096;

    /// <summary>Number of bytes the device occupies on the bus.</summary>
    public const int RegisterCount = 8;

    // Register offsets (PC16550D, Table II). Reads and writes at the same offset may reach
    // different registers; DLAB = LCR bit 7 switches offsets 0 and 1 to the divisor latch.
    private const int RBR = 0; // read, DLAB = 0: receiver buffer
    private const int THR = 0; // write, DLAB = 0: transmitter holding
    private const int DLL = 0; // DLAB = 1: divisor latch LSB
    private const int IER = 1; // DLAB = 0: interrupt enable
    private const int DLM = 1; // DLAB = 1: divisor latch MSB
    private const int IIR = 2; // read: interrupt identification
    private const int FCR = 2; // write: FIFO control
    private const int LCR = 3; // line control
    private const int MCR = 4; // modem control
    private const int LSR = 5; // line status
    private const int MSR = 6; // modem status
    private const int SCR = 7; // scratch

    // IER bits.
    private const byte IER_ERBFI = 0x01; // received data available
    private const byte IER_ETBEI = 0x02; // transmitter holding register empty
    private const byte IER_ELSI = 0x04;  // receiver line status
    private const byte IER_EDSSI = 0x08; // modem status
    private const byte IER_MASK = 0x0F;  // bits 4-7 are always 0 on a 16550A (Linux probes bit 6)

    // IIR values, in priority order (PC16550D, Table IV), and the FIFO-enabled bits.
    private const byte IIR_NO_INT = 0x01;
    private const byte IIR_RLS = 0x06;  // receiver line status: OE, PE, FE or BI
    private const byte IIR_RDA = 0x04;  // received data available (trigger level reached)
    private const byte IIR_CTI = 0x0C;  // character timeout (FIFO mode, below trigger level)
    private const byte IIR_THRE = 0x02; // transmitter holding register empty
    private const byte IIR_MS = 0x00;   // modem status
    private const byte IIR_FIFO_ENABLED = 0xC0;

    // FCR bits.
    private const byte FCR_FIFO_ENABLE = 0x01;
    private const byte FCR_CLEAR_RCVR = 0x02;
    private const byte FCR_CLEAR_XMIT = 0x04; // no effect: nothing ever waits to be sent
    private const byte FCR_DMA_MODE = 0x08;
    private const byte FCR_TRIGGER_MASK = 0xC0;

    private const byte LCR_DLAB = 0x80;

    // MCR bits; bits 5-7 read as 0 on a 16550A.
    private const byte MCR_DTR = 0x01;
    private const byte MCR_RTS = 0x02;
    private const byte MCR_OUT1 = 0x04;
    private const byte MCR_OUT2 = 0x08;
    private const byte MCR_LOOP = 0x10;
    private const byte MCR_MASK = 0x1F;

    // LSR bits.
    private const byte LSR_DR = 0x01;
    private const byte LSR_OE = 0x02;
    private const byte LSR_PE = 0x04;
    private const byte LSR_FE = 0x08;
    private const byte LSR_BI = 0x10;
    private const byte LSR_THRE = 0x20;
    private const byte LSR_TEMT = 0x40;
    private const byte LSR_ERROR_BITS = LSR_OE | LSR_PE | LSR_FE | LSR_BI;

    // MSR bits: deltas in the low nibble, line states in the high nibble.
    private const byte MSR_DCTS = 0x01;
    private const byte MSR_DDSR = 0x02;
    private const byte MSR_TERI = 0x04;
    private const byte MSR_DDCD = 0x08;
    private const byte MSR_CTS = 0x10;
    private const byte MSR_DSR = 0x20;
    private const byte MSR_RI = 0x40;
    private const byte MSR_DCD = 0x80;

    // With nothing attached to the host side we present a connected, ready modem.
    private const byte MSR_LINES_NOT_LOOPBACK = MSR_DCD | MSR_DSR | MSR_CTS;

    private const int FifoDepth = 16;

    // 115200 / 12 = 9600 baud, the usual firmware default.
    private const byte DefaultDivisorLow = 0x0C;

    private readonly IInterruptLine _irq;
    private readonly Stream _output;

    // Guards every field below. Lock order: taken alone (Trigger is called after release; the
    // output stream is written under it).
    private readonly Lock _lock = new();

    private byte _ier;
    private byte _lcr;
    private byte _mcr;
    private byte _scr;
    private byte _dll = DefaultDivisorLow;
    private byte _dlm;
    private byte _fcr;          // FIFO enable, DMA mode and trigger bits as programmed
    private byte _lsrErrors;    // OE/PE/FE/BI, cleared by reading LSR
    private byte _msrDeltas;    // DCTS/DDSR/TERI/DDCD, cleared by reading MSR
    private bool _threPending;  // THRE interrupt condition, before IER gating

    private readonly byte[] _rx = new byte[InputBufferSize];
    private int _rxHead;
    private int _rxCount;

    private long _transmitted;
    private long _lost;

    /// <summary>Creates a UART in its reset state (PC16550D, Table III "UART Reset Configuration").</summary>
    /// <param name="irq">The UART's interrupt line (ISA IRQ 4 for COM1).</param>
    /// <param name="output">Receives every byte the guest transmits, flushed per byte so it
    /// reaches the terminal promptly. Write errors are counted in <see cref="LostBytes"/>.</param>
    /// <exception cref="ArgumentNullException">An argument is null.</exception>
    public Serial8250(IInterruptLine irq, Stream output)
    {
        ArgumentNullException.ThrowIfNull(irq);
        ArgumentNullException.ThrowIfNull(output);
        _irq = irq;
        _output = output;
    }

    /// <summary>Bytes the guest has transmitted to the output stream.</summary>
    public long TransmittedBytes => Interlocked.Read(ref _transmitted);

    /// <summary>Bytes the guest transmitted that the output stream failed to take.</summary>
    public long LostBytes => Interlocked.Read(ref _lost);

    /// <summary>Free space in the input buffer, in bytes; 0 while the guest has the UART in
    /// loopback mode.</summary>
    public int InputSpace
    {
        get
        {
            lock (_lock)
                return (_mcr & MCR_LOOP) != 0 ? 0 : InputBufferSize - _rxCount;
        }
    }

    /// <summary>
    /// Queues host input (for example stdin) for the guest to receive; raises the receive
    /// interrupt when the guest has enabled it. Thread-safe.
    /// </summary>
    /// <returns>How many leading bytes of <paramref name="bytes"/> were accepted: fewer than
    /// its length when the buffer is full, and 0 while the UART is in loopback mode (its serial
    /// input is then disconnected). The caller keeps the rest and retries later.</returns>
    public int EnqueueInput(ReadOnlySpan<byte> bytes)
    {
        int accepted;
        bool trigger;
        lock (_lock)
        {
            if ((_mcr & MCR_LOOP) != 0)
                return 0;
            bool wasPending = InterruptIdLocked() != IIR_NO_INT;
            accepted = Math.Min(bytes.Length, InputBufferSize - _rxCount);
            for (int i = 0; i < accepted; i++)
                _rx[(_rxHead + _rxCount + i) % InputBufferSize] = bytes[i];
            _rxCount += accepted;
            trigger = !wasPending && InterruptIdLocked() != IIR_NO_INT;
        }
        if (trigger)
            _irq.Trigger();
        return accepted;
    }

    /// <inheritdoc/>
    /// <remarks>A wider access reads consecutive registers, one byte each.</remarks>
    public void Read(ulong offset, Span<byte> data)
    {
        bool trigger = false;
        lock (_lock)
        {
            for (int i = 0; i < data.Length; i++)
            {
                bool wasPending = InterruptIdLocked() != IIR_NO_INT;
                data[i] = ReadRegisterLocked((int)((offset + (ulong)i) % RegisterCount), out bool acknowledged);
                bool pending = InterruptIdLocked() != IIR_NO_INT;
                trigger |= pending && (!wasPending || acknowledged);
            }
        }
        if (trigger)
            _irq.Trigger();
    }

    /// <inheritdoc/>
    /// <remarks>A wider access writes consecutive registers, one byte each.</remarks>
    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        bool trigger = false;
        lock (_lock)
        {
            for (int i = 0; i < data.Length; i++)
            {
                bool wasPending = InterruptIdLocked() != IIR_NO_INT;
                WriteRegisterLocked((int)((offset + (ulong)i) % RegisterCount), data[i]);
                trigger |= !wasPending && InterruptIdLocked() != IIR_NO_INT;
            }
        }
        if (trigger)
            _irq.Trigger();
    }

    private bool DlabLocked => (_lcr & LCR_DLAB) != 0;
    private bool FifoEnabledLocked => (_fcr & FCR_FIFO_ENABLE) != 0;
    private bool LoopbackLocked => (_mcr & MCR_LOOP) != 0;

    /// <summary>Bytes the guest can see: the receive FIFO, or the RBR alone in 16450 mode.</summary>
    private int VisibleDepthLocked => FifoEnabledLocked ? FifoDepth : 1;

    /// <summary>Receive FIFO trigger level from FCR bits 7:6 (PC16550D, FCR description).</summary>
    private int TriggerLevelLocked => (_fcr & FCR_TRIGGER_MASK) switch
    {
        0x00 => 1,
        0x40 => 4,
        0x80 => 8,
        _ => 14,
    };

    /// <summary>The low nibble of IIR: the highest-priority enabled pending interrupt
    /// (PC16550D, Table IV: line status > data available / timeout > THRE > modem status).</summary>
    private byte InterruptIdLocked()
    {
        if ((_ier & IER_ELSI) != 0 && (_lsrErrors & LSR_ERROR_BITS) != 0)
            return IIR_RLS;
        if ((_ier & IER_ERBFI) != 0 && _rxCount != 0)
        {
            if (!FifoEnabledLocked || Math.Min(_rxCount, FifoDepth) >= TriggerLevelLocked)
                return IIR_RDA;
            return IIR_CTI;
        }
        if ((_ier & IER_ETBEI) != 0 && _threPending)
            return IIR_THRE;
        if ((_ier & IER_EDSSI) != 0 && _msrDeltas != 0)
            return IIR_MS;
        return IIR_NO_INT;
    }

    /// <summary>CTS, DSR, RI, DCD as the UART sees them (MSR high nibble).</summary>
    private byte ModemLinesLocked()
    {
        if (!LoopbackLocked)
            return MSR_LINES_NOT_LOOPBACK;
        // Loopback (PC16550D, MCR bit 4): the modem control outputs drive the inputs internally:
        // RTS -> CTS, DTR -> DSR, OUT1 -> RI, OUT2 -> DCD.
        byte lines = 0;
        if ((_mcr & MCR_RTS) != 0) lines |= MSR_CTS;
        if ((_mcr & MCR_DTR) != 0) lines |= MSR_DSR;
        if ((_mcr & MCR_OUT1) != 0) lines |= MSR_RI;
        if ((_mcr & MCR_OUT2) != 0) lines |= MSR_DCD;
        return lines;
    }

    private byte ReadRegisterLocked(int register, out bool acknowledged)
    {
        acknowledged = false;
        switch (register)
        {
            case DLL when DlabLocked:
                return _dll;
            case DLM when DlabLocked:
                return _dlm;
            case RBR:
                return PopReceivedLocked();
            case IER:
                return _ier;
            case IIR:
            {
                byte id = InterruptIdLocked();
                if (id == IIR_THRE)
                {
                    // Reading IIR while it reports THRE clears that interrupt (PC16550D, Table IV).
                    _threPending = false;
                    acknowledged = true;
                }
                return (byte)(id | (FifoEnabledLocked ? IIR_FIFO_ENABLED : 0));
            }
            case LCR:
                return _lcr;
            case MCR:
                return _mcr;
            case LSR:
            {
                byte lsr = (byte)(LSR_THRE | LSR_TEMT | _lsrErrors);
                if (_rxCount != 0)
                    lsr |= LSR_DR;
                // Reading LSR clears the error bits and with them the line status interrupt.
                _lsrErrors = 0;
                return lsr;
            }
            case MSR:
            {
                byte msr = (byte)(ModemLinesLocked() | _msrDeltas);
                _msrDeltas = 0;
                return msr;
            }
            case SCR:
                return _scr;
            default:
                throw new UnreachableException();
        }
    }

    private void WriteRegisterLocked(int register, byte value)
    {
        switch (register)
        {
            case DLL when DlabLocked:
                _dll = value;
                break;
            case DLM when DlabLocked:
                _dlm = value;
                break;
            case THR:
                TransmitLocked(value);
                break;
            case IER:
            {
                byte old = _ier;
                _ier = (byte)(value & IER_MASK);
                // Enabling ETBEI while THR is empty (always, here) raises THRE again, even if an
                // IIR read had cleared it; Linux's start_tx and its UART_BUG_THRE probe rely on it.
                if ((_ier & IER_ETBEI) != 0 && (old & IER_ETBEI) == 0)
                    _threPending = true;
                break;
            }
            case FCR:
                WriteFifoControlLocked(value);
                break;
            case LCR:
                _lcr = value;
                break;
            case MCR:
            {
                byte before = ModemLinesLocked();
                _mcr = (byte)(value & MCR_MASK);
                UpdateModemDeltasLocked(before, ModemLinesLocked());
                break;
            }
            case LSR:
            case MSR:
                // Read-only in normal use (factory test only); ignored.
                break;
            case SCR:
                _scr = value;
                break;
            default:
                throw new UnreachableException();
        }
    }

    private void UpdateModemDeltasLocked(byte before, byte after)
    {
        byte changed = (byte)(before ^ after);
        if ((changed & MSR_CTS) != 0) _msrDeltas |= MSR_DCTS;
        if ((changed & MSR_DSR) != 0) _msrDeltas |= MSR_DDSR;
        if ((changed & MSR_DCD) != 0) _msrDeltas |= MSR_DDCD;
        // TERI reports the trailing edge of RI only (1 -> 0).
        if ((before & MSR_RI) != 0 && (after & MSR_RI) == 0) _msrDeltas |= MSR_TERI;
    }

    private void WriteFifoControlLocked(byte value)
    {
        int visibleBefore = VisibleDepthLocked;
        bool enable = (value & FCR_FIFO_ENABLE) != 0;
        // Changing FCR0 resets both FIFOs; the other bits are programmed only with FCR0 set.
        if (enable != FifoEnabledLocked || (enable && (value & FCR_CLEAR_RCVR) != 0))
            DropReceivedLocked(visibleBefore);
        // FCR_CLEAR_XMIT needs no action: the transmit FIFO is always empty here.
        _fcr = enable ? (byte)(value & (FCR_FIFO_ENABLE | FCR_DMA_MODE | FCR_TRIGGER_MASK)) : (byte)0;
    }

    private void TransmitLocked(byte value)
    {
        // Writing THR clears a pending THRE interrupt.
        _threPending = false;
        if (LoopbackLocked)
        {
            // Loopback: the transmitter output feeds the receiver; the serial output stays idle.
            if (_rxCount < VisibleDepthLocked)
            {
                _rx[(_rxHead + _rxCount) % InputBufferSize] = value;
                _rxCount++;
            }
            else
            {
                _lsrErrors |= LSR_OE;
            }
        }
        else
        {
            try
            {
                _output.Write(new ReadOnlySpan<byte>(in value));
                _output.Flush();
                _transmitted++;
            }
            catch (IOException)
            {
                // A console that went away must not stop the guest; the byte is lost.
                _lost++;
            }
        }
        // The byte left THR and the shift register at once: both are empty again.
        _threPending = true;
    }

    private byte PopReceivedLocked()
    {
        if (_rxCount == 0)
            return 0;
        byte b = _rx[_rxHead];
        _rxHead = (_rxHead + 1) % InputBufferSize;
        _rxCount--;
        return b;
    }

    private void DropReceivedLocked(int count)
    {
        int n = Math.Min(count, _rxCount);
        _rxHead = (_rxHead + n) % InputBufferSize;
        _rxCount -= n;
    }
}
