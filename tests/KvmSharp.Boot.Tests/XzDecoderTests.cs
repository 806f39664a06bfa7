using Xunit;

namespace KvmSharp.Boot.Tests;

public class XzDecoderTests
{
    private static byte[] Sample()
    {
        // x86-ish code: many E8/E9 calls with small displacements, which the BCJ filter rewrites.
        var rng = new Random(7);
        byte[] b = new byte[300_000];
        for (int i = 0; i < b.Length; i++)
            b[i] = (i % 17) switch { 0 => 0xe8, 5 => 0xff, 6 => 0xff, _ => (byte)rng.Next(16) };
        return b;
    }

    [Theory]
    [InlineData("--check=crc32 --x86 --lzma2=dict=1MiB")]
    [InlineData("--check=crc64 --lzma2=preset=1")]
    [InlineData("--check=none --x86 --lzma2=dict=64KiB --block-size=65536")]
    [InlineData("--check=crc32 --x86=start=4096 --lzma2=dict=1MiB")]
    public void Decodes_what_xz_writes(string flags)
    {
        byte[] data = Sample();
        byte[]? xz = BzImageBuilder.ViaTool("xz", "--format=xz " + flags + " -c", data);
        if (xz is null)
            Assert.Skip("xz is not installed.");
        Assert.Equal(data, PayloadDecompressor.Decompress(xz, 0, xz.Length, "xz", "t"));
    }

    [Fact]
    public void Payload_without_size_trailer_is_accepted()
    {
        byte[] data = Sample();
        byte[]? xz = BzImageBuilder.ViaTool("xz", "--format=xz --check=crc32 --x86 --lzma2=preset=6 -c", data);
        if (xz is null)
            Assert.Skip("xz is not installed.");
        byte[] bare = xz[..^4];
        Assert.Equal(data, PayloadDecompressor.Decompress(bare, 0, bare.Length, "xz", "t"));
    }

    [Fact]
    public void Unsupported_filter_is_named()
    {
        byte[]? xz = BzImageBuilder.ViaTool("xz", "--format=xz --delta=dist=4 --lzma2 -c", Sample());
        if (xz is null)
            Assert.Skip("xz is not installed.");
        var e = Assert.Throws<BootException>(() => PayloadDecompressor.Decompress(xz, 0, xz.Length, "xz", "t"));
        Assert.Contains("filter 0x3", e.Message);
    }

    [Theory]
    [InlineData(40, 65906612, 28)]
    [InlineData(26, 65906612, 26)]
    [InlineData(40, 1, 0)]
    [InlineData(12, 1 << 20, 12)]
    public void Dictionary_is_capped_at_the_output_size(byte declared, ulong output, byte expected) =>
        Assert.Equal(expected, XzDecoder.EffectiveDictProp(declared, output));

    [Fact]
    public void Mutated_xz_streams_fail_with_BootException_or_decode_exactly()
    {
        byte[] data = Sample()[..20000];
        byte[]? xz = BzImageBuilder.ViaTool("xz", "--format=xz --check=crc32 --x86 --lzma2=dict=1MiB --block-size=8192", data);
        if (xz is null)
            Assert.Skip("xz is not installed.");
        var rng = new Random(1126);
        int decoded = 0;
        for (int iter = 0; iter < 3000; iter++)
        {
            byte[] m = (byte[])xz.Clone();
            int n = rng.Next(1, 4);
            for (int k = 0; k < n; k++)
            {
                // Favour the structure: stream header, first block header, index and footer.
                int at = rng.Next(3) switch
                {
                    0 => rng.Next(Math.Min(40, m.Length)),
                    1 => m.Length - 4 - 1 - rng.Next(Math.Min(60, m.Length - 5)),
                    _ => rng.Next(m.Length),
                };
                m[at] = rng.Next(2) == 0 ? (byte)rng.Next(256) : (byte)(m[at] ^ (1 << rng.Next(8)));
            }
            try
            {
                byte[] r = PayloadDecompressor.Decompress(m, 0, m.Length, "xz", "t");
                Assert.Equal(data, r); // a mutation the checks cannot see must not change the output
                decoded++;
            }
            catch (BootException)
            {
            }
        }
        Assert.True(decoded < 3000);
    }
}
