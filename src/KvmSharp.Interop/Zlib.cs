using System.Runtime.InteropServices;

namespace KvmSharp.Interop;

/// <summary>
/// Raw deflate through the system zlib (libz.so.1), for a window size System.IO.Compression cannot
/// limit: QEMU inflates compressed qcow2 clusters with windowBits -12 (block/qcow2-threads.c), so
/// DeflateStream output could reference distances QEMU rejects.
/// </summary>
public static unsafe partial class Zlib
{
    private const string LibraryName = "libz.so.1";
    private const int Z_FINISH = 4;
    private const int Z_STREAM_END = 1;
    private const int Z_DEFLATED = 8;
    private const int Z_DEFAULT_STRATEGY = 0;

    // z_stream on LP64 (zlib.h): 112 bytes. Fields we touch: next_in 0, avail_in 8, next_out 24, avail_out 32.
    [StructLayout(LayoutKind.Sequential)]
    private struct ZStream
    {
        public byte* next_in; public uint avail_in; public nuint total_in;
        public byte* next_out; public uint avail_out; public nuint total_out;
        public nint msg; public nint state; public nint zalloc; public nint zfree; public nint opaque;
        public int data_type; public nuint adler; public nuint reserved;
    }

    [LibraryImport(LibraryName, EntryPoint = "deflateInit2_")]
    private static partial int DeflateInit2(ZStream* s, int level, int method, int windowBits, int memLevel, int strategy, byte* version, int size);
    [LibraryImport(LibraryName, EntryPoint = "deflate")]
    private static partial int Deflate(ZStream* s, int flush);
    [LibraryImport(LibraryName, EntryPoint = "deflateEnd")]
    private static partial int DeflateEnd(ZStream* s);

    /// <summary>Compresses <paramref name="source"/> as raw deflate (no zlib header) with a window of
    /// 2^<paramref name="windowBits"/> bytes, level 6. Returns the compressed length, or -1 when it does
    /// not fit in <paramref name="destination"/>.</summary>
    /// <exception cref="NativeException">zlib could not start (deflateInit2 failed).</exception>
    public static int DeflateRaw(ReadOnlySpan<byte> source, Span<byte> destination, int windowBits)
    {
        ZStream z = default;
        ReadOnlySpan<byte> version = "1.2.11\0"u8; // zlib checks only the major version character
        // SAFETY: z lives on this stack frame for the whole deflate session; version is a pinned literal.
        fixed (byte* v = version)
        {
            int rc = DeflateInit2(&z, 6, Z_DEFLATED, -windowBits, 9, Z_DEFAULT_STRATEGY, v, sizeof(ZStream));
            if (rc != 0)
                throw new NativeException($"zlib deflateInit2 failed ({rc})");
        }
        try
        {
            // SAFETY: source and destination are pinned while zlib reads and writes them; their lengths
            // are passed with them.
            fixed (byte* ps = source)
            fixed (byte* pd = destination)
            {
                z.next_in = ps; z.avail_in = (uint)source.Length;
                z.next_out = pd; z.avail_out = (uint)destination.Length;
                int rc = Deflate(&z, Z_FINISH);
                if (rc != Z_STREAM_END) return -1;
                return destination.Length - (int)z.avail_out;
            }
        }
        finally { _ = DeflateEnd(&z); } // only frees the stream; Z_DATA_ERROR after an unfinished stream is expected
    }
}
