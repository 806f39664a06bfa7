using System.Diagnostics;
using System.Globalization;
using KvmSharp.Images;

namespace KvmSharp.Cli.Img;

/// <summary><c>img bench</c>: timed reads or writes through the image back ends (qemu-img bench).</summary>
internal static class BenchCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["c", "d", "f", "flush-interval", "i", "o", "pattern", "s", "S", "t", "object"];
    private static readonly string[] Flags = ["n", "no-drain", "q", "w", "U", "image-opts", "force-share", "wrap-usable"];

    private static int BenchInt(string v, int min, string error)
        => int.TryParse(v, NumberStyles.None, CultureInfo.InvariantCulture, out int n) && n >= min ? n : throw ImgArgs.Bad(error);

    private static ulong BenchSize(string v, ulong max, string error)
    {
        ulong n;
        try { n = ImgArgs.ParseSize(v); }
        catch (ImageException) { throw ImgArgs.Bad(error); }
        return n <= max ? n : throw ImgArgs.Bad(error);
    }

    public static int Run(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, OptionsWithValue, Flags);
        string path = a.One("image");
        bool usableWrap = a.Has("wrap-usable");
        // qemu-img bench's limits and messages: every number is checked before anything runs, so a
        // negative count cannot wrap into a run that never ends.
        int count = BenchInt(a.Get("c") ?? "75000", 0, "Invalid request count specified");
        int depth = BenchInt(a.Get("d") ?? "64", 1, "Invalid queue depth specified");
        ulong offset = a.Get("o") is { } os ? BenchSize(os, ulong.MaxValue, "Invalid offset specified") : 0;
        int size = (int)(a.Get("s") is { } ss ? BenchSize(ss, int.MaxValue, "Invalid buffer size specified. Must be between 0 and 2147483647.") : 4096);
        ulong step = a.Get("S") is { } st ? BenchSize(st, ulong.MaxValue, "Invalid step_size specified") : (ulong)size;
        int flushInterval = BenchInt(a.Get("flush-interval") ?? "0", 0, "Invalid flush interval specified");
        int patternValue = BenchInt(a.Get("pattern") ?? "0", 0, "Invalid pattern byte specified");
        if (patternValue > 255) throw ImgArgs.Bad("Invalid pattern byte specified");
        byte pattern = (byte)patternValue;
        bool write = a.Has("w");
        string cache = a.Get("t") ?? "writeback";
        if (cache != "writeback")
            throw ImgArgs.Bad($"bench: cache mode '{cache}' is not supported (only writeback; O_DIRECT is not implemented)");
        using var dev = BlockDeviceFactory.Open(path, !write, a.Get("f"), openBacking: true, forceShare: a.ForceShare);
        ulong imageSize = dev.Size;
        var buf = GC.AllocateArray<byte>(size, pinned: true);
        if (write) buf.AsSpan().Fill(pattern);
        if (!a.Has("q"))
            o.WriteLine($"Sending {count} {(write ? "write" : "read")} requests, {size} bytes each, {depth} in parallel (starting at offset {offset}, step size {step})");
        // Requests in flight: up to -d, one thread each, capped at the CPU count (QEMU keeps -d AIO
        // requests in flight from one thread; threads are our equivalent).
        int threads = Math.Max(1, Math.Min(depth, Environment.ProcessorCount));
        var seqLock = new object();
        ulong next = offset;
        int issued = 0;
        var sw = Stopwatch.StartNew();
        void Worker()
        {
            var b = threads == 1 ? buf : GC.AllocateArray<byte>(size, pinned: true);
            if (write) b.AsSpan().Fill(pattern);
            while (true)
            {
                ulong off;
                int i;
                lock (seqLock)
                {
                    if (issued == count) return;
                    i = issued++;
                    off = next;
                    // qemu-img.c bench_cb as in QEMU 7.2 (the reference here): advance by step, wrap
                    // modulo the image size. (Later QEMU wraps modulo size - bufsize: --wrap-usable.)
                    next += step;
                    if (usableWrap) next = imageSize <= (ulong)size ? 0 : next % (imageSize - (ulong)size);
                    else next = imageSize == 0 ? 0 : next % imageSize;
                }
                if (write) dev.Write(b, off);
                else dev.Read(b, off);
                if (flushInterval > 0 && (i + 1) % flushInterval == 0) dev.Flush();
            }
        }
        if (threads == 1) Worker();
        else
        {
            var ts = new Thread[threads];
            ImageException? failed = null;
            for (int t = 0; t < threads; t++)
            {
                ts[t] = new Thread(() =>
                {
                    try { Worker(); }
                    catch (ImageException e)
                    {
                        Interlocked.CompareExchange(ref failed, e, null);
                        lock (seqLock) issued = count; // stop the others
                    }
                }) { IsBackground = true };
                ts[t].Start();
            }
            foreach (var t in ts) t.Join();
            if (failed is not null) throw failed;
        }
        sw.Stop();
        if (!a.Has("q")) o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"Run completed in {sw.Elapsed.TotalSeconds:F3} seconds."));
        return 0;
    }
}
