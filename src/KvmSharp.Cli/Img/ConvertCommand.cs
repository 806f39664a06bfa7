using System.Globalization;
using KvmSharp.Images;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Cli.Img;

/// <summary><c>img convert</c>: copies an image chain into a new (or, with -n, existing) raw or qcow2 image, compressed with -c (qemu-img convert).</summary>
internal static class ConvertCommand
{
    /// <summary>Options taking a value, and flags, as qemu-img accepts them.</summary>
    private static readonly string[] OptionsWithValue = ["f", "O", "o", "t", "T", "S", "m", "object", "l", "r", "B", "F"];
    private static readonly string[] Flags = ["c", "p", "q", "n", "U", "W", "C", "image-opts", "force-share"];

    public static int Run(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, OptionsWithValue, Flags);
        if (a.Positional.Count != 2) throw ImgArgs.Bad("convert: expecting one source and one output file name");
        if (a.Has("B")) throw ImgArgs.Bad("convert -B is not supported");
        string src = a.Positional[0], dst = a.Positional[1];
        string ofmt = a.Get("O") ?? "raw";
        bool compress = a.Has("c");
        bool progress = a.Has("p") && !a.Has("q");
        if (compress && ofmt != "qcow2") throw ImgArgs.Bad("Compression not supported for this file format");
        var sourceFiles = new HashSet<FileId>();
        using var s = BlockDeviceFactory.Open(src, true, a.Get("f"), openBacking: true, forceShare: a.ForceShare, chain: sourceFiles);
        // Writing into the source (or a file of its backing chain) would destroy what is being read:
        // compared by device and inode, so hard links and other names of the same file count. Without
        // -U the locks refuse it too (our reader unshares write); with -U only this check does.
        if (ImageFile.Identify(dst) is { } dstId && sourceFiles.Contains(dstId))
            throw new ImageException(ImageErrorKind.InvalidArgument, dst, "the output file is the input image or a file of its backing chain");
        ulong size = s.Size;
        if (!a.Has("n"))
        {
            var createArgs = new List<string> { "-q", "-f", ofmt };
            if (a.Get("o") is { } opt) { createArgs.Add("-o"); createArgs.Add(opt); }
            createArgs.Add(dst);
            createArgs.Add(size.ToString(CultureInfo.InvariantCulture));
            int rc = CreateCommand.Run(createArgs.ToArray(), TextWriter.Null);
            if (rc != 0) return rc;
        }
        using var d = BlockDeviceFactory.Open(dst, false, ofmt, openBacking: false, chain: sourceFiles);
        if (d.Size < size) throw new ImageException(ImageErrorKind.InvalidArgument, dst, "output image is smaller than the source");
        var q = d as Qcow2Image;
        // qemu-img convert writes the target with cache=unsafe unless -t says otherwise: no fsync.
        string cache = a.Get("t") ?? "unsafe";
        bool unsafeCache = cache == "unsafe";
        if (q is not null) q.NoSync = unsafeCache;
        int gran = q?.ClusterSize ?? 65536;
        bool existingTarget = a.Has("n");
        int bufSize = Math.Max(gran, 2 << 20);
        // Reading the source and writing the target overlap: a reader thread fills buffers (two in
        // flight) while this thread writes, as qemu-img convert overlaps its requests.
        using var filled = new System.Collections.Concurrent.BlockingCollection<(ArraySegment<byte> Buf, ulong Off, ulong Len)>(2);
        using var free = new System.Collections.Concurrent.BlockingCollection<ArraySegment<byte>>(3);
        for (int i = 0; i < 3; i++) free.Add(PageAligned(bufSize));
        using var stop = new CancellationTokenSource(); // the writer failed: the reader must not block
        var ct = stop.Token;
        var reader = Task.Run(() =>
        {
            try
            {
                ulong roff = 0;
                ChainExtent st = default;
                while (roff < size)
                {
                    // Skip what the source chain knows to be zero or unallocated without reading it, a
                    // whole extent at a time (its length follows the metadata, not the virtual size).
                    // Skips stay multiples of the target's cluster, so compressed writes stay aligned.
                    if (roff >= st.Start + st.Length) st = ChainExtent.At(s, roff, size - roff);
                    ulong stEnd = st.Start + st.Length;
                    if (!st.Data && st.Zero)
                    {
                        ulong skip = stEnd == size ? stEnd - roff : (stEnd - roff) / (ulong)gran * (ulong)gran;
                        if (skip > 0)
                        {
                            filled.Add((default, roff, skip), ct);
                            roff += skip;
                            continue;
                        }
                    }
                    int n = (int)Math.Min((ulong)bufSize, size - roff);
                    var b = free.Take(ct);
                    s.Read(b.AsSpan(0, n), roff);
                    filled.Add((b, roff, (ulong)n), ct);
                    roff += (ulong)n;
                }
            }
            finally { filled.CompleteAdding(); }
        });
        int lastPct = -1;
        byte[]? full = null;
        try
        {
            foreach (var (b, off, length) in filled.GetConsumingEnumerable())
            {
                if (b.Array is null)
                {
                    // A fresh target reads zeros already (a raw one is a sparse file); an existing one (-n) does not.
                    if (existingTarget) d.WriteZeroes(off, length);
                }
                else
                {
                    int n = (int)length;
                    var span = b.AsSpan(0, n);
                    int i = 0;
                    while (i < n)
                    {
                        // Skip zero pieces (the fresh target reads zero); write runs of non-zero pieces at once.
                        int len = Math.Min(gran, n - i);
                        if (!existingTarget && !span.Slice(i, len).ContainsAnyExcept((byte)0)) { i += len; continue; }
                        if (compress)
                        {
                            ReadOnlySpan<byte> piece = span.Slice(i, len);
                            if (len < gran)
                            {
                                full ??= new byte[gran];
                                full.AsSpan().Clear();
                                piece.CopyTo(full);
                                piece = full;
                            }
                            q!.WriteCompressedCluster((off + (ulong)i) / (ulong)gran, piece);
                            i += len;
                            continue;
                        }
                        int j = i + len;
                        while (j < n)
                        {
                            int l2 = Math.Min(gran, n - j);
                            if (!existingTarget && !span.Slice(j, l2).ContainsAnyExcept((byte)0)) break;
                            j += l2;
                        }
                        d.Write(span[i..j], off + (ulong)i);
                        i = j;
                    }
                    free.Add(b);
                }
                if (progress)
                {
                    int pct = (int)((UInt128)(off + length) * 10000 / Math.Max(size, 1));
                    if (pct != lastPct) { o.Write(string.Create(CultureInfo.InvariantCulture, $"    ({pct / 100.0:F2}/100%)\r")); lastPct = pct; }
                }
            }
        }
        catch
        {
            stop.Cancel();
            throw;
        }
        reader.GetAwaiter().GetResult(); // surfaces read errors as ImageException
        if (progress) o.WriteLine("    (100.00/100%)");
        if (!unsafeCache || q is not null) d.Flush(); // qcow2: metadata written (fsync skipped when unsafe)
        return 0;
    }

    /// <summary>A page-aligned buffer (pinned, so it never moves), as QEMU's qemu_blockalign: the
    /// kernel copies whole pages to and from the page cache.</summary>
    private static ArraySegment<byte> PageAligned(int size)
    {
        var a = GC.AllocateUninitializedArray<byte>(size + 4096, pinned: true);
        // The array is on the pinned object heap: its address is stable for the life of the segment.
        nint addr = System.Runtime.InteropServices.Marshal.UnsafeAddrOfPinnedArrayElement(a, 0);
        int skip = (int)((4096 - (addr & 4095)) & 4095);
        return new ArraySegment<byte>(a, skip, size);
    }
}
