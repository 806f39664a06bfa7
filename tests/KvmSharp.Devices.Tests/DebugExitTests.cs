namespace KvmSharp.Devices.Tests;

public class DebugExitTests
{
    [Fact]
    public void AnyWrite_CallsExitWithTheValue()
    {
        var codes = new List<byte>();
        var bus = new Bus();
        bus.Insert(new DebugExit(codes.Add), 0xF4, 4);
        Assert.True(bus.TryWrite(0xF4, [0x31]));
        Assert.True(bus.TryWrite(0xF4, [0x00, 0x01, 0x02, 0x03])); // outl: first byte
        Assert.Equal(new byte[] { 0x31, 0x00 }, codes.ToArray());
        Span<byte> b = [0xEE];
        Assert.True(bus.TryRead(0xF4, b));
        Assert.Equal(0, b[0]);
    }
}
