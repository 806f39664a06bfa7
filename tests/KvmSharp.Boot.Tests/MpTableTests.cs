using System.Text;
using Xunit;

namespace KvmSharp.Boot.Tests;

public class MpTableTests
{
    private static byte Sum(ReadOnlySpan<byte> s)
    {
        byte x = 0;
        foreach (byte b in s)
            x += b;
        return x;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(7)]
    [InlineData(254)]
    public void Tables_parse_back_with_correct_checksums(int cpus)
    {
        using var m = Mem.Create(64 * Mem.MiB);
        MpTable.Write(m, cpus);
        byte[] fp = Mem.Read(m, LowMemory.MpTable, 16);
        Assert.Equal("_MP_", Encoding.ASCII.GetString(fp, 0, 4));
        Assert.Equal(0, Sum(fp));
        Assert.Equal(1, fp[8]);
        Assert.Equal(4, fp[9]);
        Assert.Equal(0, fp[11]); // feature byte 1: a configuration table is present
        uint cfgAddr = BitConverter.ToUInt32(fp, 4);
        Assert.Equal(0UL, cfgAddr % 4);

        byte[] hdr = Mem.Read(m, cfgAddr, 44);
        Assert.Equal("PCMP", Encoding.ASCII.GetString(hdr, 0, 4));
        int length = BitConverter.ToUInt16(hdr, 4);
        byte[] cfg = Mem.Read(m, cfgAddr, length);
        Assert.Equal(0, Sum(cfg));
        Assert.Equal(4, cfg[6]);
        Assert.Equal("KVMSHARP", Encoding.ASCII.GetString(cfg, 8, 8));
        int count = BitConverter.ToUInt16(cfg, 34);
        Assert.Equal(0xFEE00000u, BitConverter.ToUInt32(cfg, 36));
        Assert.True(cfgAddr + (ulong)length <= 0x100000);

        int p = 44;
        var cpusSeen = new List<(byte Id, byte Flags)>();
        var ints = new List<(byte Type, byte Irq, byte ApicId, byte Pin)>();
        var lints = new List<(byte Type, byte Dest, byte Lint)>();
        byte ioapicId = 0xff;
        string? bus = null;
        for (int i = 0; i < count; i++)
        {
            switch (cfg[p])
            {
                case 0:
                    cpusSeen.Add((cfg[p + 1], cfg[p + 3]));
                    Assert.Equal(0x14, cfg[p + 2]);
                    p += 20;
                    break;
                case 1:
                    bus = Encoding.ASCII.GetString(cfg, p + 2, 6);
                    p += 8;
                    break;
                case 2:
                    ioapicId = cfg[p + 1];
                    Assert.Equal(0x11, cfg[p + 2]);
                    Assert.Equal(1, cfg[p + 3]);
                    Assert.Equal(0xFEC00000u, BitConverter.ToUInt32(cfg, p + 4));
                    p += 8;
                    break;
                case 3:
                    ints.Add((cfg[p + 1], cfg[p + 5], cfg[p + 6], cfg[p + 7]));
                    Assert.Equal(0, cfg[p + 4]);
                    p += 8;
                    break;
                case 4:
                    lints.Add((cfg[p + 1], cfg[p + 6], cfg[p + 7]));
                    p += 8;
                    break;
                default:
                    Assert.Fail($"unknown entry type {cfg[p]}");
                    break;
            }
        }
        Assert.Equal(length, p);
        Assert.Equal("ISA   ", bus);
        Assert.Equal(cpus, ioapicId);
        Assert.Equal(Enumerable.Range(0, cpus).Select(i => ((byte)i, (byte)(i == 0 ? 3 : 1))), cpusSeen);
        Assert.Equal(Enumerable.Range(0, 16).Select(i => ((byte)0, (byte)i, (byte)cpus, (byte)i)), ints);
        Assert.Equal([((byte)3, (byte)0, (byte)0), ((byte)1, (byte)0xff, (byte)1)], lints);
    }

    [Fact]
    public void Cpu_count_out_of_range_is_rejected()
    {
        using var m = Mem.Create(64 * Mem.MiB);
        Assert.Throws<BootException>(() => MpTable.Write(m, 0));
        Assert.Throws<BootException>(() => MpTable.Write(m, 255));
    }
}
