using System.Buffers.Binary;
using Microsoft.Win32.SafeHandles;

namespace KvmSharp.Images.Qcow2;

/// <summary>
/// The host file under a qcow2 image: positioned reads and writes with the image's error context,
/// fsync, big-endian tables, and the header fields that change after creation, written by name
/// (<see cref="Qcow2Header.Field"/>). Tracks how far the file reaches: <see cref="End"/> (allocated
/// clusters included) and <see cref="WrittenEnd"/> (beyond it the file is a hole that reads as zeros).
/// <para>Not thread-safe except <see cref="Read"/> and <see cref="WriteInPlace"/>, which the image runs
/// outside its lock; everything else runs under it.</para>
/// </summary>
internal sealed class Qcow2File : IDisposable
{
    private readonly SafeFileHandle _handle;
    private readonly ulong _clusterOffsetMask;
    private readonly byte[] _tableBuffer; // one cluster: big-endian tables are written through it

    public string Path { get; }

    /// <summary>Bytes, cluster aligned: the larger of the file's length and every cluster allocated so far.</summary>
    public ulong End { get; private set; }

    /// <summary>Bytes actually written: beyond it the file is a hole (reads as zeros).</summary>
    public ulong WrittenEnd { get; private set; }

    /// <summary>cache=unsafe (qemu-img convert's default for the target): no fsync at all. Ordering of
    /// writes is kept, so a killed process still leaves only leaks; a power loss may lose more.</summary>
    public bool NoSync { get; set; }

    /// <summary>The file's length now.</summary>
    public long Length => RandomAccess.GetLength(_handle);

    public Qcow2File(SafeFileHandle handle, string path, int clusterSize)
    {
        _handle = handle;
        Path = path;
        _clusterOffsetMask = (ulong)clusterSize - 1;
        _tableBuffer = new byte[clusterSize];
        long length = RandomAccess.GetLength(handle);
        End = ((ulong)length + _clusterOffsetMask) & ~_clusterOffsetMask;
        WrittenEnd = (ulong)length;
    }

    /// <summary>Counts clusters up to <paramref name="end"/> as part of the file (allocation).</summary>
    public void ExtendTo(ulong end)
    {
        if (end > End) End = end;
    }

    /// <summary>Counts bytes up to <paramref name="end"/> as written, before a <see cref="WriteInPlace"/>
    /// that runs outside the lock.</summary>
    public void NoteWritten(ulong end)
    {
        if (end > WrittenEnd) WrittenEnd = end;
    }

    /// <summary>Reads metadata, which must lie inside <see cref="End"/>: past it the image is corrupt.</summary>
    public void ReadMetadata(Span<byte> dst, ulong offset, string what)
    {
        ulong end = offset + (ulong)dst.Length;
        if (end < offset || offset > long.MaxValue || end > End)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, Path, $"{what} at 0x{offset:x} lies beyond the end of the file", (long)Math.Min(offset, long.MaxValue));
        Read(dst, offset);
    }

    /// <summary>Reads <paramref name="dst"/> at <paramref name="offset"/>; past the end of the file reads
    /// zeros, as QEMU's file driver does.</summary>
    public void Read(Span<byte> dst, ulong offset)
    {
        try
        {
            int done = 0;
            while (done < dst.Length)
            {
                int n = RandomAccess.Read(_handle, dst[done..], (long)offset + done);
                if (n <= 0) { dst[done..].Clear(); return; }
                done += n;
            }
        }
        catch (IOException e) { ThrowHelper.Io(Path, "read", e, (long)offset); }
    }

    /// <summary>Reads a big-endian u64 table (L1, refcount table) of <paramref name="table"/>'s length.</summary>
    public void ReadTable(ulong[] table, ulong offset, string what)
    {
        byte[] buf = new byte[Math.Min(table.Length * 8L, 1 << 20)];
        int done = 0;
        while (done < table.Length)
        {
            int n = Math.Min(table.Length - done, buf.Length / 8);
            var span = buf.AsSpan(0, n * 8);
            ReadMetadata(span, checked(offset + (ulong)done * 8), what);
            for (int i = 0; i < n; i++) table[done + i] = BinaryPrimitives.ReadUInt64BigEndian(span[(i * 8)..]);
            done += n;
        }
    }

    /// <summary>Writes <paramref name="src"/> and extends <see cref="End"/>/<see cref="WrittenEnd"/> over it.</summary>
    public void Write(ReadOnlySpan<byte> src, ulong offset)
    {
        WriteInPlace(src, offset);
        ulong end = offset + (ulong)src.Length;
        NoteWritten(end);
        ExtendTo((end + _clusterOffsetMask) & ~_clusterOffsetMask);
    }

    /// <summary>Writes into a cluster the image owns, without bookkeeping (the caller did it under the lock).</summary>
    public void WriteInPlace(ReadOnlySpan<byte> src, ulong offset)
    {
        try { RandomAccess.Write(_handle, src, (long)offset); }
        catch (IOException e) { ThrowHelper.Io(Path, "write", e, (long)offset); }
    }

    /// <summary>Writes entries [<paramref name="from"/>, <paramref name="to"/>) of a big-endian u64 table
    /// that starts at <paramref name="tableOffset"/>, in cluster-sized pieces.</summary>
    public void WriteTable(ulong[] table, int from, int to, ulong tableOffset)
    {
        int perPiece = _tableBuffer.Length / 8;
        for (int i = from; i < to; i += perPiece)
        {
            int n = Math.Min(perPiece, to - i);
            var piece = _tableBuffer.AsSpan(0, n * 8);
            for (int j = 0; j < n; j++) BinaryPrimitives.WriteUInt64BigEndian(piece[(j * 8)..], table[i + j]);
            Write(piece, tableOffset + (ulong)i * 8);
        }
    }

    /// <summary>fsync, unless <see cref="NoSync"/>.</summary>
    public void Sync()
    {
        if (NoSync) return;
        try { RandomAccess.FlushToDisk(_handle); }
        catch (IOException e) { ThrowHelper.Io(Path, "fsync", e); }
    }

    /// <summary>Writes one u64 header field (<see cref="Qcow2Header.Field"/>).</summary>
    public void WriteHeaderField(int field, ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        Write(b, (ulong)field);
    }

    /// <summary>Points the header at a new L1 table: l1_size and l1_table_offset are adjacent and change
    /// in one write, so the header never names a table with the other one's size.</summary>
    public void WriteL1TableFields(uint l1Size, ulong l1TableOffset)
    {
        Span<byte> b = stackalloc byte[12];
        BinaryPrimitives.WriteUInt32BigEndian(b, l1Size);
        BinaryPrimitives.WriteUInt64BigEndian(b[(Qcow2Header.Field.L1TableOffset - Qcow2Header.Field.L1Size)..], l1TableOffset);
        Write(b, Qcow2Header.Field.L1Size);
    }

    /// <summary>Points the header at a new refcount table: refcount_table_offset and
    /// refcount_table_clusters are adjacent and change in one write.</summary>
    public void WriteRefcountTableFields(ulong refcountTableOffset, uint refcountTableClusters)
    {
        Span<byte> b = stackalloc byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(b, refcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(b[(Qcow2Header.Field.RefcountTableClusters - Qcow2Header.Field.RefcountTableOffset)..], refcountTableClusters);
        Write(b, Qcow2Header.Field.RefcountTableOffset);
    }

    public void Dispose() => _handle.Dispose();
}
