using KvmSharp.Boot.Acpi;
using Xunit;

namespace KvmSharp.Boot.Tests.Acpi;

public class AmlBuilderTests
{
    /// <summary>Reference decoder for PkgLength (ACPI 6.5 §20.2.4): returns (value, bytes used).</summary>
    private static (int Value, int Bytes) DecodePkgLength(ReadOnlySpan<byte> b)
    {
        int follow = b[0] >> 6;
        if (follow == 0)
            return (b[0] & 0x3F, 1);
        Assert.Equal(0, b[0] & 0x30); // bits 5-4 reserved when more bytes follow
        int v = b[0] & 0x0F;
        for (int i = 1; i <= follow; i++)
            v |= b[i] << (4 + 8 * (i - 1));
        return (v, follow + 1);
    }

    [Theory]
    [InlineData(0, new byte[] { 0x01 })]
    [InlineData(62, new byte[] { 0x3F })]
    [InlineData(63, new byte[] { 0x41, 0x04 })]              // 63 + 2 = 65 = 0x41
    [InlineData(0xFFD, new byte[] { 0x4F, 0xFF })]          // 0xFFD + 2 = 0xFFF: largest 2-byte form
    [InlineData(0xFFE, new byte[] { 0x81, 0x00, 0x01 })]    // 0xFFE + 3 = 0x1001
    [InlineData(0xFFFFC, new byte[] { 0x8F, 0xFF, 0xFF })]  // 0xFFFFF: largest 3-byte form
    [InlineData(0xFFFFD, new byte[] { 0xC1, 0x00, 0x00, 0x01 })]
    [InlineData(0xFFFFFFB, new byte[] { 0xCF, 0xFF, 0xFF, 0xFF })] // 2^28 - 1
    public void PkgLength_uses_the_shortest_form_and_counts_itself(int body, byte[] expected)
    {
        Assert.Equal(expected, AmlBuilder.EncodePkgLength(body));
    }

    [Fact]
    public void PkgLength_round_trips_across_every_boundary()
    {
        int[] probes = [0, 1, 61, 62, 63, 64, 65, 100, 0xFFC, 0xFFD, 0xFFE, 0xFFF, 0x1000, 0xFFFFB, 0xFFFFC, 0xFFFFD, 0xFFFFE, 0x123456, 0xFFFFFFB];
        foreach (int body in probes)
        {
            byte[] e = AmlBuilder.EncodePkgLength(body);
            var (v, n) = DecodePkgLength(e);
            Assert.Equal(e.Length, n);
            Assert.Equal(body + n, v);
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => AmlBuilder.EncodePkgLength(0xFFFFFFC));
        Assert.Throws<ArgumentOutOfRangeException>(() => AmlBuilder.EncodePkgLength(-1));
    }

    [Fact]
    public void Large_objects_get_multi_byte_PkgLength_that_spans_the_body()
    {
        var a = new AmlBuilder();
        a.Name("BUF").Buffer(new byte[5000]);
        byte[] aml = a.ToArray();
        Assert.Equal(0x11, aml[5]);              // NameOp + "BUF_" then BufferOp
        var (v, n) = DecodePkgLength(aml.AsSpan(6));
        Assert.Equal(3, n);
        Assert.Equal(aml.Length - 6, v);         // PkgLength covers itself up to the end
    }

    [Theory]
    [InlineData("PNP0A03", 0x030AD041u)]
    [InlineData("PNP0A08", 0x080AD041u)]
    [InlineData("PNP0501", 0x0105D041u)]
    [InlineData("PNP0C02", 0x020CD041u)]
    public void EisaId_compresses_like_iasl(string id, uint expected)
    {
        Assert.Equal(expected, AmlBuilder.EncodeEisaId(id));
    }

    [Theory]
    [InlineData("pnp0a03")]
    [InlineData("PNP0A0")]
    [InlineData("PNP0A0G")]
    [InlineData("P1P0A03")]
    public void EisaId_rejects_malformed_ids(string id)
    {
        Assert.Throws<ArgumentException>(() => AmlBuilder.EncodeEisaId(id));
    }

    [Theory]
    [InlineData("_SB", new byte[] { 0x5F, 0x53, 0x42, 0x5F })]
    [InlineData("\\_SB", new byte[] { 0x5C, 0x5F, 0x53, 0x42, 0x5F })]
    [InlineData("\\_SB.PCI0", new byte[] { 0x5C, 0x2E, 0x5F, 0x53, 0x42, 0x5F, 0x50, 0x43, 0x49, 0x30 })]
    [InlineData("^^A.B.C", new byte[] { 0x5E, 0x5E, 0x2F, 3, 0x41, 0x5F, 0x5F, 0x5F, 0x42, 0x5F, 0x5F, 0x5F, 0x43, 0x5F, 0x5F, 0x5F })]
    [InlineData("\\", new byte[] { 0x5C, 0x00 })]
    public void NameString_encodes_prefixes_and_segments(string path, byte[] expected)
    {
        Assert.Equal(expected, AmlBuilder.EncodeNameString(path));
    }

    [Theory]
    [InlineData("TOOLONG")]
    [InlineData("1ABC")]
    [InlineData("ab")]
    [InlineData("A..B")]
    public void NameString_rejects_bad_segments(string path)
    {
        Assert.Throws<ArgumentException>(() => AmlBuilder.EncodeNameString(path));
    }

    [Theory]
    [InlineData(0UL, new byte[] { 0x00 })]
    [InlineData(1UL, new byte[] { 0x01 })]
    [InlineData(2UL, new byte[] { 0x0A, 0x02 })]
    [InlineData(0xFFUL, new byte[] { 0x0A, 0xFF })]
    [InlineData(0x100UL, new byte[] { 0x0B, 0x00, 0x01 })]
    [InlineData(0x10000UL, new byte[] { 0x0C, 0x00, 0x00, 0x01, 0x00 })]
    [InlineData(0x100000000UL, new byte[] { 0x0E, 0, 0, 0, 0, 1, 0, 0, 0 })]
    public void Integers_take_the_shortest_encoding(ulong value, byte[] expected)
    {
        Assert.Equal(expected, new AmlBuilder().Integer(value).ToArray());
    }

    [Fact]
    public void Package_counts_its_elements_including_nested_packages()
    {
        var a = new AmlBuilder();
        a.BeginPackage().Integer(5).BeginPackage().Integer(1).Integer(2).End().String("ab").End();
        // PackageOp PkgLength NumElements=3 | 0x0A 05 | PackageOp PkgLength 2 01 0A 02 | 0D 'a' 'b' 00
        Assert.Equal(new byte[] { 0x12, 0x0E, 3, 0x0A, 5, 0x12, 0x05, 2, 0x01, 0x0A, 0x02, 0x0D, 0x61, 0x62, 0x00 }, a.ToArray());
    }

    [Fact]
    public void Device_and_method_encode_as_in_the_spec()
    {
        var a = new AmlBuilder();
        a.BeginDevice("DEV").BeginMethod("_STA", 1, serialized: true).Return().Integer(0xF).End().End();
        Assert.Equal(new byte[]
        {
            0x5B, 0x82, 0x0F, 0x44, 0x45, 0x56, 0x5F,           // DeviceOp PkgLength "DEV_"
            0x14, 0x09, 0x5F, 0x53, 0x54, 0x41, 0x09,           // MethodOp PkgLength "_STA" flags (1 arg, serialized)
            0xA4, 0x0A, 0x0F,                                   // Return (0x0F)
        }, a.ToArray());
    }

    [Fact]
    public void Unbalanced_objects_are_our_bug_and_throw()
    {
        Assert.Throws<InvalidOperationException>(() => new AmlBuilder().End());
        Assert.Throws<InvalidOperationException>(() => new AmlBuilder().BeginScope("_SB").ToArray());
        var big = new AmlBuilder().BeginPackage();
        for (int i = 0; i < 256; i++)
            big.Integer(0);
        Assert.Throws<InvalidOperationException>(() => big.End());
        Assert.Throws<ArgumentException>(() => new AmlBuilder().String("\0"));
    }

    [Fact]
    public void Resource_descriptors_have_their_spec_lengths()
    {
        Assert.Equal(new byte[] { 0x47, 1, 0xF8, 0x03, 0xF8, 0x03, 1, 8, 0x79, 0 }, new ResourceTemplate().Io(0x3F8, 0x3F8, 1, 8).ToArray());
        Assert.Equal(new byte[] { 0x22, 0x10, 0x00, 0x79, 0 }, new ResourceTemplate().IrqNoFlags(4).ToArray());
        Assert.Equal(16 + 2, new ResourceTemplate().WordBusNumber(0, 0).ToArray().Length);
        Assert.Equal(16 + 2, new ResourceTemplate().WordIo(0, 0xCF7).ToArray().Length);
        Assert.Equal(26 + 2, new ResourceTemplate().DWordMemory(0xC0000000, 0xDFFFFFFF, false).ToArray().Length);
        Assert.Equal(46 + 2, new ResourceTemplate().QWordMemory(1UL << 36, (2UL << 36) - 1, true).ToArray().Length);
        Assert.Equal(12 + 2, new ResourceTemplate().Memory32Fixed(0xE0000000, 0x100000).ToArray().Length);
        Assert.Equal(5 + 4 * 2 + 2, new ResourceTemplate().Interrupt(true, true, true, 16, 17).ToArray().Length);
        Assert.Throws<ArgumentException>(() => new ResourceTemplate().WordIo(0, 0xFFFF));
        Assert.Throws<ArgumentException>(() => new ResourceTemplate().DWordMemory(2, 1, false));
        Assert.Throws<ArgumentOutOfRangeException>(() => new ResourceTemplate().IrqNoFlags(16));
    }
}
