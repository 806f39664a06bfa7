namespace KvmSharp.Devices;

/// <summary>
/// The PC/AT keyboard controller (Intel 8042 as programmed by IBM AT firmware; OSDev "8042 PS/2
/// Controller") without a keyboard or mouse behind it: enough for firmware and Linux's i8042
/// driver (booted with <c>i8042.noaux i8042.nomux i8042.dumbkbd</c>) to probe it without
/// hanging, and for the CPU-reset command that Linux's "reboot=k" path and firmware use.
/// </summary>
/// <remarks>
/// <para>Port map: data at 0x60 (offset <see cref="DataOffset"/>), status/command at 0x64
/// (offset <see cref="CommandOffset"/>). Insert the device itself at 0x60 with length 5 only if
/// nothing else needs 0x61-0x63; normally insert <see cref="DataPort"/> at 0x60 and
/// <see cref="CommandPort"/> at 0x64 (length 1 each), leaving 0x61 to <see cref="PortB"/>.</para>
/// <para>The controller executes each command at once, so the input buffer is never full
/// (status IBF = 0) and results are ready in the output buffer (status OBF = 1) before the guest
/// polls. No interrupt line: there is no keyboard to produce IRQ 1, and command results are
/// polled. Bytes written to the data port with no command pending would go to the keyboard; with
/// none attached they are dropped and nothing answers, as Linux's atkbd probe then expects.</para>
/// <para><c>resetRequested</c> runs on the vCPU thread that wrote the command, after the
/// device's lock is released; it should only ask the VMM to reset or stop, not do it inline.</para>
/// </remarks>
public sealed class I8042 : IBusDevice
{
    /// <summary>Offset of the data port (0x60) from the device base.</summary>
    public const int DataOffset = 0;

    /// <summary>Offset of the status/command port (0x64) from the device base.</summary>
    public const int CommandOffset = 4;

    // Status register bits.
    private const byte STATUS_OBF = 0x01;     // output buffer full: data at 0x60 for the CPU
    private const byte STATUS_SYS = 0x04;     // system flag, copied from the command byte
    private const byte STATUS_A2 = 0x08;      // last write was to 0x64 (command), not 0x60 (data)
    private const byte STATUS_UNLOCKED = 0x10; // keyboard not inhibited by the key lock

    // Command byte (controller RAM byte 0) bits.
    private const byte CTR_KBDINT = 0x01;
    private const byte CTR_AUXINT = 0x02;
    private const byte CTR_SYS = 0x04;
    private const byte CTR_KBDDIS = 0x10;
    private const byte CTR_AUXDIS = 0x20;
    private const byte CTR_XLATE = 0x40;

    // Controller commands (written to 0x64).
    private const byte CMD_READ_CTR = 0x20;      // 0x21-0x3F read other RAM bytes
    private const byte CMD_WRITE_CTR = 0x60;     // 0x61-0x7F write other RAM bytes
    private const byte CMD_AUX_DISABLE = 0xA7;
    private const byte CMD_AUX_ENABLE = 0xA8;
    private const byte CMD_AUX_TEST = 0xA9;
    private const byte CMD_SELF_TEST = 0xAA;
    private const byte CMD_KBD_TEST = 0xAB;
    private const byte CMD_KBD_DISABLE = 0xAD;
    private const byte CMD_KBD_ENABLE = 0xAE;
    private const byte CMD_READ_INPUT_PORT = 0xC0;
    private const byte CMD_READ_OUTPUT_PORT = 0xD0;
    private const byte CMD_WRITE_OUTPUT_PORT = 0xD1;
    private const byte CMD_WRITE_KBD_OUTPUT = 0xD2;
    private const byte CMD_WRITE_AUX_OUTPUT = 0xD3;
    private const byte CMD_WRITE_AUX = 0xD4;
    private const byte CMD_READ_TEST_INPUTS = 0xE0;
    private const byte CMD_PULSE_FIRST = 0xF0;   // 0xF0-0xFF pulse output port bits 0-3 low
                                                 // for each 0 bit; 0xFE pulses bit 0 = CPU reset

    private const byte SELF_TEST_PASSED = 0x55;
    private const byte INTERFACE_TEST_PASSED = 0x00;
    private const byte INTERFACE_TEST_CLOCK_HIGH = 0x02; // no device on the aux port

    // Output port bits.
    private const byte OUTPUT_PORT_RESET = 0x01; // active low: 0 holds the CPU in reset
    private const byte OUTPUT_PORT_A20 = 0x02;

    private const int OutputQueueSize = 16;

    private readonly Action _resetRequested;

    // Guards every field below. Lock order: taken alone; the reset callback runs after release.
    private readonly Lock _lock = new();
    private byte _ctr = CTR_KBDINT | CTR_AUXINT | CTR_SYS | CTR_XLATE;
    private byte _outputPort = OUTPUT_PORT_RESET | OUTPUT_PORT_A20;
    private byte _pendingCommand; // a command waiting for its data byte at 0x60, or 0
    private bool _lastWriteWasCommand;
    private readonly byte[] _output = new byte[OutputQueueSize];
    private int _outputHead;
    private int _outputCount;
    private byte _lastData;

    /// <summary>Creates a controller after a passed power-on self test.</summary>
    /// <param name="resetRequested">Called when the guest pulses the CPU reset line
    /// (command 0xFE, or clearing output port bit 0).</param>
    /// <exception cref="ArgumentNullException"><paramref name="resetRequested"/> is null.</exception>
    public I8042(Action resetRequested)
    {
        ArgumentNullException.ThrowIfNull(resetRequested);
        _resetRequested = resetRequested;
        DataPort = new PortView(this, DataOffset);
        CommandPort = new PortView(this, CommandOffset);
    }

    /// <summary>The data port alone, for inserting at 0x60 with length 1.</summary>
    public IBusDevice DataPort { get; }

    /// <summary>The status/command port alone, for inserting at 0x64 with length 1.</summary>
    public IBusDevice CommandPort { get; }

    /// <inheritdoc/>
    /// <remarks>Offsets other than 0 and 4 read 0xFF; wider accesses repeat the byte.</remarks>
    public void Read(ulong offset, Span<byte> data)
    {
        byte value;
        lock (_lock)
        {
            value = offset switch
            {
                DataOffset => ReadDataLocked(),
                CommandOffset => StatusLocked(),
                _ => 0xFF,
            };
        }
        data.Fill(value);
    }

    /// <inheritdoc/>
    /// <remarks>Only the first byte of a wider write is used.</remarks>
    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        if (data.IsEmpty)
            return;
        bool reset = false;
        lock (_lock)
        {
            switch (offset)
            {
                case DataOffset:
                    _lastWriteWasCommand = false;
                    reset = WriteDataLocked(data[0]);
                    break;
                case CommandOffset:
                    _lastWriteWasCommand = true;
                    reset = CommandLocked(data[0]);
                    break;
            }
        }
        if (reset)
            _resetRequested();
    }

    private byte StatusLocked()
    {
        byte status = STATUS_UNLOCKED;
        if (_outputCount != 0) status |= STATUS_OBF;
        if ((_ctr & CTR_SYS) != 0) status |= STATUS_SYS;
        if (_lastWriteWasCommand) status |= STATUS_A2;
        return status;
    }

    private byte ReadDataLocked()
    {
        // An empty output buffer reads as the last byte the controller delivered.
        if (_outputCount != 0)
        {
            _lastData = _output[_outputHead];
            _outputHead = (_outputHead + 1) % OutputQueueSize;
            _outputCount--;
        }
        return _lastData;
    }

    private void QueueLocked(byte value)
    {
        if (_outputCount == OutputQueueSize)
            return; // a guest that never reads loses the newest results
        _output[(_outputHead + _outputCount) % OutputQueueSize] = value;
        _outputCount++;
    }

    /// <returns>True when the command resets the CPU.</returns>
    private bool CommandLocked(byte command)
    {
        _pendingCommand = 0;
        switch (command)
        {
            case CMD_READ_CTR:
                QueueLocked(_ctr);
                break;
            case > CMD_READ_CTR and <= 0x3F:
                QueueLocked(0); // other controller RAM bytes: unused, zero
                break;
            case >= CMD_WRITE_CTR and <= 0x7F:
            case CMD_WRITE_OUTPUT_PORT:
            case CMD_WRITE_KBD_OUTPUT:
            case CMD_WRITE_AUX_OUTPUT:
            case CMD_WRITE_AUX:
                _pendingCommand = command;
                break;
            case CMD_AUX_DISABLE:
                _ctr |= CTR_AUXDIS;
                break;
            case CMD_AUX_ENABLE:
                _ctr = (byte)(_ctr & ~CTR_AUXDIS);
                break;
            case CMD_AUX_TEST:
                QueueLocked(INTERFACE_TEST_CLOCK_HIGH);
                break;
            case CMD_SELF_TEST:
                _ctr |= CTR_SYS;
                QueueLocked(SELF_TEST_PASSED);
                break;
            case CMD_KBD_TEST:
                QueueLocked(INTERFACE_TEST_PASSED);
                break;
            case CMD_KBD_DISABLE:
                _ctr |= CTR_KBDDIS;
                break;
            case CMD_KBD_ENABLE:
                _ctr = (byte)(_ctr & ~CTR_KBDDIS);
                break;
            case CMD_READ_INPUT_PORT:
            case CMD_READ_TEST_INPUTS:
                QueueLocked(0);
                break;
            case CMD_READ_OUTPUT_PORT:
                QueueLocked(_outputPort);
                break;
            case >= CMD_PULSE_FIRST:
                // Bits 0-3 that are 0 select output port lines to pulse low; line 0 is reset.
                return (command & OUTPUT_PORT_RESET) == 0;
            default:
                break; // unknown or vendor commands: ignored
        }
        return false;
    }

    /// <returns>True when the write resets the CPU.</returns>
    private bool WriteDataLocked(byte value)
    {
        byte command = _pendingCommand;
        _pendingCommand = 0;
        switch (command)
        {
            case CMD_WRITE_CTR:
                _ctr = value;
                break;
            case CMD_WRITE_OUTPUT_PORT:
                _outputPort = value;
                // A20 (bit 1) cannot be masked under KVM and is ignored; bit 0 low resets the CPU.
                return (value & OUTPUT_PORT_RESET) == 0;
            case CMD_WRITE_KBD_OUTPUT:
                QueueLocked(value); // as if the keyboard had sent it
                break;
            default:
                // 0x61-0x7F (other RAM bytes), 0xD3/0xD4 (no aux device) and bytes for the
                // absent keyboard: dropped.
                break;
        }
        return false;
    }

    /// <summary>One port of the controller, inserted on its own.</summary>
    private sealed class PortView(I8042 owner, ulong offset) : IBusDevice
    {
        public void Read(ulong _, Span<byte> data) => owner.Read(offset, data);

        public void Write(ulong _, ReadOnlySpan<byte> data) => owner.Write(offset, data);
    }
}

/// <summary>
/// PC/AT System Control Port B at port 0x61 (IBM PC/AT Technical Reference, "Port 61h"),
/// reduced to what software polls: bit 4 (refresh request) toggles on every read, because
/// firmware and older kernels time short delays by waiting for it to change.
/// </summary>
/// <remarks>
/// Bits 0-3 (timer 2 gate, speaker data, parity/channel-check enables) read back as written.
/// There is no PIT here: bit 5 (timer 2 output) follows the refresh toggle while the timer 2
/// gate (bit 0) is set and reads 0 otherwise, so a loop waiting for it ends instead of
/// hanging. When the VMM creates KVM's in-kernel PIT, KVM claims port 0x61 itself (its speaker
/// port, or a dummy with KVM_PIT_SPEAKER_DUMMY) and this device never sees an access.
/// </remarks>
public sealed class PortB : IBusDevice
{
    private const byte WRITABLE_BITS = 0x0F;
    private const byte TIMER2_GATE = 0x01;
    private const byte REFRESH = 0x10;
    private const byte TIMER2_OUT = 0x20;

    private int _written;
    private int _reads;

    /// <inheritdoc/>
    public void Read(ulong offset, Span<byte> data)
    {
        // The first read sees the bit set, the next clear, and so on.
        int refresh = (Interlocked.Increment(ref _reads) & 1) != 0 ? REFRESH : 0;
        int written = Volatile.Read(ref _written);
        int value = written | refresh;
        if ((written & TIMER2_GATE) != 0 && refresh != 0)
            value |= TIMER2_OUT;
        data.Fill((byte)value);
    }

    /// <inheritdoc/>
    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        if (!data.IsEmpty)
            Volatile.Write(ref _written, data[0] & WRITABLE_BITS);
    }
}
