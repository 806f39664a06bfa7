using System.Runtime.InteropServices;

namespace KvmSharp.Images.Qcow2;

/// <summary>
/// Raw deflate with a 4 KiB window through the system zlib. QEMU inflates compressed clusters with
/// windowBits -12 (block/qcow2-threads.c), and System.IO.Compression cannot limit the window, so
/// DeflateStream output could reference distances QEMU rejects. Used only when writing compressed
/// clusters (convert -c); reading uses DeflateStream.
/// </summary>
internal static unsafe partial class Zlib
{
    // z_stream on LP64 (zlib.h): 112 bytes. Fields we touch: next_in 0, avail_in 8, next_out 24, avail_out 32.
    [StructLayout(LayoutKind.Sequential)]
    private struct ZStream
    {
        public byte* next_in; public uint avail_in; public nuint total_in;
        public byte* next_out; public uint avail_out; public nuint total_out;
        public nint msg; public nint state; public nint zalloc; public nint zfree; public nint opaque;
        public int data_type; public nuint adler; public nuint reserved;
    }

    [LibraryImport("libz.so.1", EntryPoint = "deflateInit2_")]
    private static partial int DeflateInit2(ZStream* s, int level, int method, int windowBits, int memLevel, int strategy, byte* version, int size);
    [LibraryImport("libz.so.1", EntryPoint = "deflate")]
    private static partial int Deflate(ZStream* s, int flush);
    [LibraryImport("libz.so.1", EntryPoint = "deflateEnd")]
    private static partial int DeflateEnd(ZStream* s);

    /// <summary>Compresses <paramref name="src"/>; returns the compressed length, or -1 when it does not fit.</summary>
    public static int CompressRaw12(ReadOnlySpan<byte> src, Span<byte> dst)
    {
        ZStream z = default;
        ReadOnlySpan<byte> ver = "1.2.11\0"u8; // zlib checks only the major version character
        // SAFETY: z lives on this stack frame for the whole deflate session; src/dst are pinned below.
        fixed (byte* v = ver)
        {
            if (DeflateInit2(&z, 6, 8, -12, 9, 0, v, sizeof(ZStream)) != 0)
                ThrowHelper.Throw(ImageErrorKind.Io, null, "zlib deflateInit2 failed");
        }
        try
        {
            fixed (byte* ps = src)
            fixed (byte* pd = dst)
            {
                z.next_in = ps; z.avail_in = (uint)src.Length;
                z.next_out = pd; z.avail_out = (uint)dst.Length;
                int rc = Deflate(&z, 4 /* Z_FINISH */);
                if (rc != 1 /* Z_STREAM_END */) return -1;
                return dst.Length - (int)z.avail_out;
            }
        }
        finally { DeflateEnd(&z); }
    }
}
