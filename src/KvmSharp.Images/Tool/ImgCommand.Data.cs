using System.Diagnostics;
using System.Globalization;
using KvmSharp.Images.Qcow2;

namespace KvmSharp.Images.Tool;

public static partial class ImgCommand
{
    /// <summary>One extent of a chain's allocation map, as qemu-img map reports it.</summary>
    private struct Extent
    {
        public ulong Start, Length;
        public int Depth;
        public bool Present, Zero, Data;
        public ulong Offset; // valid when HasOffset
        public bool HasOffset;
        public string? File;
    }

    private static string PathOf(IBlockDevice d) => d switch
    {
        Qcow2Image q => q.Path,
        RawImage r => r.Path,
        _ => "?",
    };

    /// <summary>Walks the chain at <paramref name="off"/>: which layer provides the data, and how, for
    /// as many bytes (up to <paramref name="max"/>) as the answer holds. Each layer answers from its
    /// metadata (<see cref="IBlockDevice.GetBlockStatus"/>), so a long unallocated or zero run is one step.</summary>
    private static Extent ChainStatus(IBlockDevice top, ulong off, ulong max)
    {
        IBlockDevice dev = top;
        int depth = 0;
        while (true)
        {
            // A backing file shorter than its overlay reads as zeros past its end (qemu reports the overlay's depth).
            if (off >= dev.Size)
                return new Extent { Start = off, Length = max, Depth = Math.Max(0, depth - 1), Present = false, Zero = true };
            var st = dev.GetBlockStatus(off, max);
            var e = new Extent { Start = off, Length = st.Length, Depth = depth, HasOffset = st.HasOffset, Offset = st.HasOffset ? st.HostOffset : 0 };
            switch (st.State)
            {
                case BlockState.Data:
                    e.Present = e.Data = true;
                    if (e.HasOffset) e.File = PathOf(dev);
                    return e;
                case BlockState.Zero:
                    e.Present = e.Zero = true;
                    return e;
            }
            IBlockDevice? backing = (dev as Qcow2Image)?.Backing;
            if (backing is null)
            {
                e.Zero = true;
                return e;
            }
            dev = backing;
            max = st.Length;
            depth++;
        }
    }

    private static IEnumerable<Extent> MapExtents(IBlockDevice top)
    {
        ulong off = 0, size = top.Size;
        Extent cur = default;
        bool have = false;
        while (off < size)
        {
            var e = ChainStatus(top, off, size - off);
            if (e.Length == 0) break;
            if (have && cur.Depth == e.Depth && cur.Present == e.Present && cur.Zero == e.Zero && cur.Data == e.Data
                && cur.HasOffset == e.HasOffset && (!e.HasOffset || cur.Offset + cur.Length == e.Offset && cur.File == e.File))
            {
                cur.Length += e.Length;
            }
            else
            {
                if (have) yield return cur;
                cur = e;
                have = true;
            }
            off += e.Length;
        }
        if (have) yield return cur;
    }

    private static int Map(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, new[] { "f", "output", "start-offset", "max-length", "object" }, new[] { "U", "image-opts", "force-share" });
        string path = One(a, "image");
        string output = a.Get("output") ?? "human";
        using var dev = BlockDeviceFactory.Open(path, true, a.Get("f"), openBacking: true, forceShare: ForceShare(a));
        if (output == "json")
        {
            bool first = true;
            o.Write('[');
            foreach (var e in MapExtents(dev))
            {
                if (!first) o.Write(",\n");
                first = false;
                o.Write(string.Create(CultureInfo.InvariantCulture,
                    $"{{ \"start\": {e.Start}, \"length\": {e.Length}, \"depth\": {e.Depth}, \"present\": {Bool(e.Present)}, \"zero\": {Bool(e.Zero)}, \"data\": {Bool(e.Data)}"));
                if (e.HasOffset) o.Write(string.Create(CultureInfo.InvariantCulture, $", \"offset\": {e.Offset}"));
                o.Write('}');
            }
            o.WriteLine(']');
        }
        else
        {
            o.WriteLine(string.Format(CultureInfo.InvariantCulture, "{0,-16}{1,-16}{2,-16}{3}", "Offset", "Length", "Mapped to", "File"));
            foreach (var e in MapExtents(dev))
            {
                if (!e.Data || !e.HasOffset) continue;
                o.WriteLine(string.Format(CultureInfo.InvariantCulture, "{0,-16}{1,-16}{2,-16}{3}", Hex(e.Start), Hex(e.Length), Hex(e.Offset), e.File));
            }
        }
        return 0;
    }

    private static string Hex(ulong v) => v == 0 ? "0" : "0x" + v.ToString("x", CultureInfo.InvariantCulture);

    // ------------------------------------------------------------------ convert

    private static int Convert(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, new[] { "f", "O", "o", "t", "T", "S", "m", "object", "l", "r", "B", "F" }, new[] { "c", "p", "q", "n", "U", "W", "C", "image-opts", "force-share" });
        if (a.Positional.Count != 2) throw ImgArgs.Bad("convert: expecting one source and one output file name");
        if (a.Has("B")) throw ImgArgs.Bad("convert -B is not supported");
        string src = a.Positional[0], dst = a.Positional[1];
        string ofmt = a.Get("O") ?? "raw";
        bool compress = a.Has("c");
        bool progress = a.Has("p") && !a.Has("q");
        if (compress && ofmt != "qcow2") throw ImgArgs.Bad("Compression not supported for this file format");
        var sourceFiles = new HashSet<FileId>();
        using var s = BlockDeviceFactory.Open(src, true, a.Get("f"), openBacking: true, forceShare: ForceShare(a), chain: sourceFiles);
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
            int rc = Create(createArgs.ToArray(), TextWriter.Null);
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
                Extent st = default;
                while (roff < size)
                {
                    // Skip what the source chain knows to be zero or unallocated without reading it, a
                    // whole extent at a time (its length follows the metadata, not the virtual size).
                    // Skips stay multiples of the target's cluster, so compressed writes stay aligned.
                    if (roff >= st.Start + st.Length) st = ChainStatus(s, roff, size - roff);
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
    private static unsafe ArraySegment<byte> PageAligned(int size)
    {
        var a = GC.AllocateUninitializedArray<byte>(size + 4096, pinned: true);
        // SAFETY: the array is pinned (POH), so its address is stable for the life of the segment.
        nint addr = (nint)System.Runtime.CompilerServices.Unsafe.AsPointer(ref a[0]);
        int skip = (int)((4096 - (addr & 4095)) & 4095);
        return new ArraySegment<byte>(a, skip, size);
    }

    // ------------------------------------------------------------------ commit

    private static int Commit(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, new[] { "f", "t", "b", "r", "object" }, new[] { "q", "d", "p", "image-opts" });
        string path = One(a, "image");
        if (a.Has("b")) throw ImgArgs.Bad("commit -b is not supported; the image is committed into its immediate backing file");
        string fmt = a.Get("f") ?? BlockDeviceFactory.Probe(path);
        if (fmt != "qcow2") throw new ImageException(ImageErrorKind.UnsupportedFeature, path, "Image does not have a backing file");
        string basePath;
        string? baseFmt;
        ulong topSize;
        using (var top = BlockDeviceFactory.OpenQcow2(path, true))
        {
            if (top.Header.BackingFile is null) throw new ImageException(ImageErrorKind.InvalidArgument, path, "Image does not have a backing file");
            basePath = BlockDeviceFactory.ResolveBackingPath(path, top.Header.BackingFile);
            baseFmt = top.Header.BackingFormat;
            topSize = top.Size;
            // The base (and its chain) must not be the overlay itself, under any name: committing an
            // image into itself and then emptying it would lose its data.
            var files = new HashSet<FileId>();
            if (ImageFile.Identify(path) is { } topId)
            {
                if (ImageFile.Identify(basePath) == topId)
                    throw new ImageException(ImageErrorKind.BackingChain, path, "backing chain loops back to this file");
                files.Add(topId);
            }
            using var b = BlockDeviceFactory.Open(basePath, false, baseFmt, openBacking: true, chain: files);
            if (b.Size < topSize)
            {
                if (b is RawImage rb) rb.Resize(topSize);
                else if (b is Qcow2Image qb) qb.Resize(topSize);
            }
            var buf = new byte[Math.Max(top.ClusterSize, 1 << 20)];
            ulong off = 0;
            while (off < topSize)
            {
                // Extent by extent: an unallocated run of the overlay costs one step, whatever its length.
                var st = top.GetBlockStatus(off, topSize - off);
                if (st.State == BlockState.Data)
                {
                    for (ulong done = 0; done < st.Length;)
                    {
                        var span = buf.AsSpan(0, (int)Math.Min((ulong)buf.Length, st.Length - done));
                        top.Read(span, off + done); // top opened without its backing: allocated ranges read their own data
                        b.Write(span, off + done);
                        done += (ulong)span.Length;
                    }
                }
                else if (st.State == BlockState.Zero) b.WriteZeroes(off, st.Length);
                off += st.Length;
            }
            b.Flush();
        }
        if (!a.Has("d"))
        {
            // Empty the overlay (qemu-img commit's make_empty): every cluster falls through to the base again.
            using var top = BlockDeviceFactory.OpenQcow2(path, false);
            top.FinishOpen();
            // Only clusters the metadata maps (data, zero, or a host cluster behind unallocated subclusters).
            for (ulong off = 0; off < top.Size;)
            {
                var st = top.GetBlockStatus(off, top.Size - off);
                if (st.State != BlockState.Unallocated || st.HasOffset)
                {
                    ulong last = (off + st.Length - 1) / (ulong)top.ClusterSize;
                    for (ulong vc = off / (ulong)top.ClusterSize; vc <= last; vc++) top.UnmapCluster(vc);
                }
                off += st.Length;
            }
            top.Flush();
        }
        if (!a.Has("q")) o.WriteLine("Image committed.");
        return 0;
    }

    // ------------------------------------------------------------------ rebase

    private static int Rebase(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, new[] { "f", "b", "F", "t", "T", "object" }, new[] { "q", "u", "p", "U", "image-opts", "force-share" });
        string path = One(a, "image");
        if (!a.Has("b")) throw ImgArgs.Bad("Must specify backing file (-b) or use '-b \"\"' to remove it");
        string newName = a.Get("b")!;
        string? newFmt = a.Get("F");
        string fmt = a.Get("f") ?? BlockDeviceFactory.Probe(path);
        if (fmt != "qcow2") throw new ImageException(ImageErrorKind.UnsupportedFeature, path, "rebase needs a qcow2 image");
        string? name = newName.Length == 0 ? null : newName;
        string? newPath = name is null ? null : BlockDeviceFactory.ResolveBackingPath(path, name);
        // An image cannot be its own backing file, by any name (qemu-img -u would write the loop).
        FileId? topId = ImageFile.Identify(path);
        if (newPath is not null && topId is not null && ImageFile.Identify(newPath) == topId)
            throw new ImageException(ImageErrorKind.BackingChain, path, "cannot rebase an image onto itself");
        if (newPath is not null && newFmt is null && File.Exists(newPath))
            newFmt = BlockDeviceFactory.Probe(newPath);
        if (a.Has("u"))
        {
            using var t = BlockDeviceFactory.OpenQcow2(path, false);
            t.FinishOpen();
            t.SetBacking(name, newFmt);
            return 0;
        }
        // Safe mode: copy into the overlay every cluster it does not hold whose content differs between
        // the old and the new backing chain, then switch the header. The new chain must not contain
        // the overlay (that loop would make it read itself).
        bool share = ForceShare(a);
        using var top = (Qcow2Image)BlockDeviceFactory.Open(path, false, "qcow2", openBacking: true, forceShare: share);
        var files = topId is { } tid ? new HashSet<FileId> { tid } : new HashSet<FileId>();
        using IBlockDevice? nb = newPath is null ? null : BlockDeviceFactory.Open(newPath, true, newFmt, openBacking: true, forceShare: share, chain: files);
        int cs = top.ClusterSize;
        var oldBuf = new byte[cs];
        var newBuf = new byte[cs];
        ulong off = 0;
        while (off < top.Size)
        {
            var st = top.GetBlockStatus(off, top.Size - off);
            ulong end = off + st.Length;
            if (st.State != BlockState.Unallocated)
            {
                off = end;
                continue;
            }
            while (off < end)
            {
                // Ranges both chains know to be zero need no reading (one step per extent).
                ulong len = end - off;
                if (top.Backing is { } ob0)
                {
                    var olds = ChainStatus(ob0, off, len);
                    if (olds.Data || !olds.Zero) len = 0;
                    else len = olds.Length;
                }
                if (len > 0 && nb is not null && off < nb.Size)
                {
                    var news = ChainStatus(nb, off, len);
                    len = news.Data || !news.Zero ? 0 : news.Length;
                }
                if (len > 0)
                {
                    off += len;
                    continue;
                }
                int n = (int)Math.Min((ulong)cs - off % (ulong)cs, end - off);
                var ob = oldBuf.AsSpan(0, n);
                var nbuf = newBuf.AsSpan(0, n);
                top.Read(ob, off);
                nbuf.Clear();
                if (nb is not null && off < nb.Size)
                {
                    int m = (int)Math.Min((ulong)n, nb.Size - off);
                    nb.Read(nbuf[..m], off);
                }
                if (!ob.SequenceEqual(nbuf)) top.Write(ob, off);
                off += (ulong)n;
            }
        }
        top.Flush();
        top.SetBacking(name, newFmt);
        return 0;
    }

    // ------------------------------------------------------------------ resize

    private static int Resize(string[] args, TextWriter o)
    {
        // "-1G" would parse as an option: qemu-img accepts "--" or a size as the last argument; so do we.
        string[] pre = args;
        string? sizeArg = null;
        if (args.Length >= 2 && (args[^1].StartsWith('-') || args[^1].StartsWith('+')) && args[^1].Length > 1 && char.IsDigit(args[^1][1]))
        {
            sizeArg = args[^1];
            pre = args[..^1];
        }
        var a = ImgArgs.Parse(pre, new[] { "f", "preallocation", "object" }, new[] { "q", "shrink", "image-opts" });
        if (sizeArg is null)
        {
            if (a.Positional.Count != 2) throw ImgArgs.Bad("Expecting image file name and size");
            sizeArg = a.Positional[1];
        }
        else if (a.Positional.Count != 1) throw ImgArgs.Bad("Expecting image file name and size");
        string path = a.Positional[0];
        // Parsed before the image is opened: a bad size touches nothing.
        char sign = sizeArg[0] is '+' or '-' ? sizeArg[0] : ' ';
        ulong amount = ImgArgs.ParseSize(sign == ' ' ? sizeArg : sizeArg[1..]); // <= INT64_MAX
        using var dev = BlockDeviceFactory.Open(path, false, a.Get("f"), openBacking: false);
        ulong cur = dev.Size, target;
        if (sign == '+') target = cur + amount; // both < 2^63: no wrap
        else if (sign == '-') target = amount >= cur ? 0 : cur - amount;
        else target = amount;
        if (target == 0) throw ImgArgs.Bad("New image size must be positive");
        if (target > ImgArgs.MaxSize - 511) throw ImgArgs.Bad($"Invalid image size specified. Must be between 0 and {ImgArgs.MaxSize}.");
        target = (target + 511) & ~511UL;
        if (target < cur && !a.Has("shrink"))
            throw new ImageException(ImageErrorKind.InvalidArgument, path, "Use the --shrink option to perform a shrink operation.");
        if (dev is RawImage r) r.Resize(target);
        else ((Qcow2Image)dev).Resize(target);
        if (!a.Has("q")) o.WriteLine("Image resized.");
        return 0;
    }

    // ------------------------------------------------------------------ compare

    private static int Compare(string[] args, TextWriter o, TextWriter e)
    {
        var a = ImgArgs.Parse(args, new[] { "f", "F", "T", "object" }, new[] { "p", "q", "s", "U", "image-opts", "force-share" });
        if (a.Positional.Count != 2) throw ImgArgs.Bad("Expecting two image file names");
        bool quiet = a.Has("q");
        bool share = ForceShare(a);
        using var d1 = BlockDeviceFactory.Open(a.Positional[0], true, a.Get("f"), openBacking: true, forceShare: share);
        using var d2 = BlockDeviceFactory.Open(a.Positional[1], true, a.Get("F"), openBacking: true, forceShare: share);
        ulong common = Math.Min(d1.Size, d2.Size);
        var b1 = new byte[1 << 20];
        var b2 = new byte[1 << 20];
        ulong off = 0;
        Extent s1 = default, s2 = default;
        while (off < common)
        {
            // Each side's extent is asked once and kept until passed: zero or unallocated on both sides
            // is skipped in one step, so time follows the metadata, not the virtual size.
            if (off >= s1.Start + s1.Length) s1 = ChainStatus(d1, off, common - off);
            if (off >= s2.Start + s2.Length) s2 = ChainStatus(d2, off, common - off);
            ulong until = Math.Min(s1.Start + s1.Length, s2.Start + s2.Length);
            if (!s1.Data && !s2.Data && s1.Zero && s2.Zero)
            {
                off = until;
                continue;
            }
            int n = (int)Math.Min((ulong)b1.Length, until - off);
            d1.Read(b1.AsSpan(0, n), off);
            d2.Read(b2.AsSpan(0, n), off);
            int same = b1.AsSpan(0, n).CommonPrefixLength(b2.AsSpan(0, n));
            if (same < n)
            {
                if (!quiet) o.WriteLine($"Content mismatch at offset {(off + (ulong)same) & ~511UL}!");
                return 1;
            }
            off += (ulong)n;
        }
        if (d1.Size != d2.Size)
        {
            if (a.Has("s"))
            {
                if (!quiet) o.WriteLine("Strict mode: Image size mismatch!");
                return 1;
            }
            if (!quiet) e.WriteLine("Warning: Image size mismatch!");
            var big = d1.Size > d2.Size ? d1 : d2;
            Extent t = default;
            while (off < big.Size)
            {
                if (off >= t.Start + t.Length) t = ChainStatus(big, off, big.Size - off);
                if (!t.Data && t.Zero)
                {
                    off = t.Start + t.Length;
                    continue;
                }
                int n = (int)Math.Min((ulong)b1.Length, t.Start + t.Length - off);
                big.Read(b1.AsSpan(0, n), off);
                int z = b1.AsSpan(0, n).IndexOfAnyExcept((byte)0);
                if (z >= 0)
                {
                    if (!quiet) o.WriteLine($"Content mismatch at offset {(off + (ulong)z) & ~511UL}!");
                    return 1;
                }
                off += (ulong)n;
            }
        }
        if (!quiet) o.WriteLine("Images are identical.");
        return 0;
    }

    // ------------------------------------------------------------------ bench

    private static int BenchInt(string v, int min, string error)
        => int.TryParse(v, NumberStyles.None, CultureInfo.InvariantCulture, out int n) && n >= min ? n : throw ImgArgs.Bad(error);

    private static ulong BenchSize(string v, ulong max, string error)
    {
        ulong n;
        try { n = ImgArgs.ParseSize(v); }
        catch (ImageException) { throw ImgArgs.Bad(error); }
        return n <= max ? n : throw ImgArgs.Bad(error);
    }

    private static int Bench(string[] args, TextWriter o)
    {
        var a = ImgArgs.Parse(args, new[] { "c", "d", "f", "flush-interval", "i", "o", "pattern", "s", "S", "t", "object" }, new[] { "n", "no-drain", "q", "w", "U", "image-opts", "force-share", "wrap-usable" });
        string path = One(a, "image");
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
        using var dev = BlockDeviceFactory.Open(path, !write, a.Get("f"), openBacking: true, forceShare: ForceShare(a));
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
