using KvmSharp.Boot;

namespace KvmSharp.Fuzz;

/// <summary>
/// Fuzz targets "xz" and "payload". "xz": the bytes are an .xz stream for <see cref="XzDecoder"/>
/// (called directly: <see cref="PayloadDecompressor"/> wraps every decoder exception into a
/// BootException, which would hide our own IndexOutOfRange). "payload": the bytes are a bzImage
/// payload for <see cref="PayloadDecompressor"/> (format from the magic; gzip, xz, lzma, bzip2, zstd,
/// lz4) — there only memory and time can fail. The documented outcome is <see cref="BootException"/>.
/// Shared, as source, with tests/KvmSharp.Boot.Tests/FuzzRegressionTests.cs.
/// </summary>
internal static class XzTarget
{
    /// <summary>Output cap for the xz target: below the payload cap so a bomb is cheap to refuse.</summary>
    private const int MaxOutput = 64 << 20;

    public static string? RunXz(ReadOnlySpan<byte> data)
    {
        try
        {
            XzDecoder.Decode(data, MaxOutput, "fuzz");
        }
        catch (BootException e)
        {
            return e.Message;
        }
        return null;
    }

    public static string? RunPayload(ReadOnlySpan<byte> data)
    {
        try
        {
            string? format = PayloadDecompressor.Detect(data);
            if (format is null)
                return "unknown format";
            byte[] bytes = data.ToArray();
            PayloadDecompressor.Decompress(bytes, 0, bytes.Length, format, "fuzz");
        }
        catch (BootException e)
        {
            return e.Message;
        }
        return null;
    }
}
