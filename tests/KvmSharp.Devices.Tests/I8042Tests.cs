namespace KvmSharp.Devices.Tests;

public class I8042Tests
{
    private const byte STR_OBF = 0x01, STR_IBF = 0x02, STR_SYS = 0x04, STR_CMDDAT = 0x08;

    private sealed class Kbc
    {
        public int Resets;
        public readonly Bus Pio = new();
        public readonly I8042 Device;

        public Kbc()
        {
            Device = new I8042(() => Resets++);
            Pio.Insert(Device.DataPort, 0x60, 1);
            Pio.Insert(Device.CommandPort, 0x64, 1);
            Pio.Insert(new PortB(), 0x61, 1);
        }

        public byte In(ushort port)
        {
            Span<byte> b = stackalloc byte[1];
            Assert.True(Pio.TryRead(port, b));
            return b[0];
        }

        public void Out(ushort port, byte value) => Assert.True(Pio.TryWrite(port, [value]));

        public byte Status => In(0x64);

        /// <summary>Linux i8042_command: wait for IBF clear, write, then poll OBF and read the result.</summary>
        public byte? Command(byte command, byte? param = null, bool expectResult = true)
        {
            Assert.Equal(0, Status & STR_IBF);
            Out(0x64, command);
            if (param is byte p)
            {
                Assert.Equal(0, Status & STR_IBF);
                Out(0x60, p);
            }
            if (!expectResult)
                return null;
            for (int i = 0; i < 10; i++)
                if ((Status & STR_OBF) != 0)
                    return In(0x60);
            return null;
        }
    }

    [Fact]
    public void ResetCommand_CallsBack()
    {
        var k = new Kbc();
        k.Out(0x64, 0xFE);
        Assert.Equal(1, k.Resets);
        k.Out(0x64, 0xFF); // pulse nothing
        Assert.Equal(1, k.Resets);
        k.Out(0x64, 0xF0); // pulses all four lines, reset among them
        Assert.Equal(2, k.Resets);
    }

    [Fact]
    public void WriteOutputPortWithResetBitLow_CallsBack()
    {
        var k = new Kbc();
        k.Command(0xD1, 0xDF, expectResult: false); // A20 on, reset line high: the usual A20 enable
        Assert.Equal(0, k.Resets);
        Assert.Equal((byte?)0xDF, k.Command(0xD0));
        k.Command(0xD1, 0xDE, expectResult: false);
        Assert.Equal(1, k.Resets);
    }

    [Fact]
    public void Status_IsSaneAtReset()
    {
        var k = new Kbc();
        byte status = k.Status;
        Assert.Equal(0, status & (STR_OBF | STR_IBF));
        Assert.NotEqual(0, status & STR_SYS);
        Assert.NotEqual(0xFF, status);
    }

    [Fact]
    public void LinuxControllerProbe_SelfTestAndCtr()
    {
        var k = new Kbc();
        // i8042_flush: nothing to drain.
        Assert.Equal(0, k.Status & STR_OBF);

        // i8042_controller_selftest.
        Assert.Equal((byte)0x55, k.Command(0xAA));
        Assert.Equal(0, k.Status & STR_OBF);

        // i8042_controller_init: a stable CTR read, then a write that sticks.
        byte? ctr0 = k.Command(0x20);
        byte? ctr1 = k.Command(0x20);
        Assert.NotNull(ctr0);
        Assert.Equal(ctr0, ctr1);
        byte ctr = (byte)((ctr0!.Value & ~0x10) | 0x01); // enable kbd, kbd interrupt
        k.Command(0x60, ctr, expectResult: false);
        Assert.Equal(ctr, k.Command(0x20));

        // Keyboard interface test.
        Assert.Equal((byte)0x00, k.Command(0xAB));
        // No aux device.
        Assert.NotEqual((byte)0x00, k.Command(0xA9));
    }

    [Fact]
    public void EnableDisableCommands_UpdateCtrAndAnswerNothing()
    {
        var k = new Kbc();
        byte ctr = k.Command(0x20)!.Value;
        k.Out(0x64, 0xA7);
        k.Out(0x64, 0xAD);
        Assert.Equal(0, k.Status & STR_OBF);
        Assert.Equal((byte?)(ctr | 0x30), k.Command(0x20));
        k.Out(0x64, 0xA8);
        k.Out(0x64, 0xAE);
        Assert.Equal((byte?)(ctr & ~0x30), k.Command(0x20));
    }

    [Fact]
    public void Status_A2TracksLastPortWritten()
    {
        var k = new Kbc();
        k.Out(0x64, 0xAD);
        Assert.NotEqual(0, k.Status & STR_CMDDAT);
        k.Out(0x60, 0xF4); // to the (absent) keyboard: dropped, no answer
        Assert.Equal(0, k.Status & STR_CMDDAT);
        Assert.Equal(0, k.Status & STR_OBF);
    }

    [Fact]
    public void WriteKeyboardOutputBuffer_ReadsBackAsData()
    {
        var k = new Kbc();
        k.Command(0xD2, 0x1C, expectResult: false);
        Assert.NotEqual(0, k.Status & STR_OBF);
        Assert.Equal(0x1C, k.In(0x60));
        Assert.Equal(0x1C, k.In(0x60)); // empty buffer reads the last byte again
        Assert.Equal(0, k.Status & STR_OBF);
    }

    [Fact]
    public void FiveByteWindow_UsesOffsetsZeroAndFour()
    {
        int resets = 0;
        var dev = new I8042(() => resets++);
        Span<byte> b = stackalloc byte[1];
        dev.Write(I8042.CommandOffset, [0xAA]);
        dev.Read(I8042.DataOffset, b);
        Assert.Equal(0x55, b[0]);
        dev.Read(2, b);
        Assert.Equal(0xFF, b[0]);
        dev.Write(I8042.CommandOffset, [0xFE]);
        Assert.Equal(1, resets);
    }

    [Fact]
    public void PortB_RefreshBitToggles()
    {
        var k = new Kbc();
        byte first = k.In(0x61);
        byte second = k.In(0x61);
        byte third = k.In(0x61);
        Assert.NotEqual(first & 0x10, second & 0x10);
        Assert.Equal(first & 0x10, third & 0x10);
    }

    [Fact]
    public void PortB_WritableBitsReadBack_Timer2OutputMovesWhileGated()
    {
        var portB = new PortB();
        Span<byte> b = stackalloc byte[1];
        portB.Write(0, [0xFF]);
        bool sawHigh = false, sawLow = false;
        for (int i = 0; i < 4; i++)
        {
            portB.Read(0, b);
            Assert.Equal(0x0F, b[0] & 0x0F);
            Assert.Equal(0, b[0] & 0xC0);
            if ((b[0] & 0x20) != 0) sawHigh = true; else sawLow = true;
        }
        Assert.True(sawHigh && sawLow);
        portB.Write(0, [0x00]);
        for (int i = 0; i < 4; i++)
        {
            portB.Read(0, b);
            Assert.Equal(0, b[0] & 0x2F);
        }
    }
}
