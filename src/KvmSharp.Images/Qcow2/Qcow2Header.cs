using System.Buffers.Binary;
using System.Text;

namespace KvmSharp.Images.Qcow2;

/// <summary>Named limits and constants from QEMU docs/interop/qcow2.txt, with the reason for each cap.</summary>
internal static class Qcow2Const
{
    public const uint Magic = 0x514649fb; // "QFI\xfb", qcow2.txt "Header"
    public const int V2HeaderLength = 72;
    public const int V3MinHeaderLength = 104;
    /// <summary>512 B clusters: qcow2.txt "cluster_bits ... must not be less than 9".</summary>
    public const int MinClusterBits = 9;
    /// <summary>2 MiB clusters: QEMU's limit (MAX_CLUSTER_BITS 21); bigger values only serve hostile images.</summary>
    public const int MaxClusterBits = 21;
    /// <summary>QEMU's QCOW_MAX_L1_SIZE (32 MiB of L1 entries); bounds memory we allocate for L1.</summary>
    public const ulong MaxL1Bytes = 32UL * 1024 * 1024;
    /// <summary>QEMU's QCOW_MAX_REFTABLE_SIZE (8 MiB).</summary>
    public const ulong MaxRefTableBytes = 8UL * 1024 * 1024;
    /// <summary>qcow2.txt: backing file name "must not be longer than 1023 bytes".</summary>
    public const int MaxBackingNameLength = 1023;
    /// <summary>Virtual size cap (QEMU's QCOW_MAX_... 2^63 - 512 rounding; we keep 2^56 = 64 PiB so offsets never overflow).</summary>
    public const ulong MaxVirtualSize = 1UL << 56;
    /// <summary>Backing chain depth cap; QEMU has none besides stack, we keep chains short and loops finite.</summary>
    public const int MaxBackingDepth = 32;
    /// <summary>Snapshot table cap: QEMU's QCOW_MAX_SNAPSHOTS.</summary>
    public const uint MaxSnapshots = 65536;

    // qcow2.txt "Host cluster offset" masks: bits 9-55 of L1/L2 entries.
    public const ulong OffsetMask = 0x00fffffffffffe00UL;
    public const ulong CopiedFlag = 1UL << 63;
    public const ulong CompressedFlag = 1UL << 62;
    public const ulong ZeroFlag = 1UL; // bit 0 of a standard L2 entry (v3 only)
    public const ulong L1ReservedMask = 0x7f000000000001ffUL;

    // Incompatible feature bits (qcow2.txt header byte 72).
    public const ulong IncompatDirty = 1UL << 0;
    public const ulong IncompatCorrupt = 1UL << 1;
    public const ulong IncompatDataFile = 1UL << 2;
    public const ulong IncompatCompression = 1UL << 3;
    public const ulong IncompatExtendedL2 = 1UL << 4;
    public const ulong IncompatKnown = 0x1f;
    public const ulong CompatLazyRefcounts = 1UL << 0;
    public const ulong AutoclearBitmaps = 1UL << 0;
    public const ulong AutoclearDataFileRaw = 1UL << 1;

    // Header extension types (qcow2.txt "Header extensions").
    public const uint ExtEnd = 0;
    public const uint ExtBackingFormat = 0xe2792aca;
    public const uint ExtFeatureTable = 0x6803f857;
    public const uint ExtBitmaps = 0x23852875;
    public const uint ExtCrypto = 0x0537be77;
    public const uint ExtDataFile = 0x44415441;
}

internal sealed class Qcow2Header
{
    public uint Version;
    public ulong BackingFileOffset;
    public uint BackingFileSize;
    public int ClusterBits;
    public ulong Size;
    public uint CryptMethod;
    public uint L1Size;
    public ulong L1TableOffset;
    public ulong RefcountTableOffset;
    public uint RefcountTableClusters;
    public uint NbSnapshots;
    public ulong SnapshotsOffset;
    public ulong Incompatible;
    public ulong Compatible;
    public ulong Autoclear;
    public int RefcountOrder = 4;
    public uint HeaderLength = Qcow2Const.V2HeaderLength;
    public byte CompressionType;

    public string? BackingFile;
    public string? BackingFormat;
    public bool HasBitmapsExtension;
    /// <summary>(type, bit) → name from the feature name table.</summary>
    public List<(int Type, int Bit, string Name)> FeatureNames = new();
    /// <summary>Unknown extensions, kept verbatim so a header rewrite preserves them.</summary>
    public List<(uint Type, byte[] Data)> UnknownExtensions = new();

    public int ClusterSize => 1 << ClusterBits;
    public bool ExtendedL2 => (Incompatible & Qcow2Const.IncompatExtendedL2) != 0;
    public int L2EntrySize => ExtendedL2 ? 16 : 8;
    public int L2Entries => ClusterSize / L2EntrySize;
    public int L2Bits => ExtendedL2 ? ClusterBits - 4 : ClusterBits - 3;
    public int RefcountBits => 1 << RefcountOrder;

    /// <summary>Parses and validates the header in <paramref name="cluster0"/> (the first min(cluster, file) bytes).</summary>
    /// <param name="fileLength">Length of the image file, bounding every table offset.</param>
    public static Qcow2Header Parse(ReadOnlySpan<byte> buf, long fileLength, string path)
    {
        if (buf.Length < Qcow2Const.V2HeaderLength || BinaryPrimitives.ReadUInt32BigEndian(buf) != Qcow2Const.Magic)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, "not a qcow2 image (bad magic)", 0);
        var h = new Qcow2Header();
        h.Version = BinaryPrimitives.ReadUInt32BigEndian(buf[4..]);
        if (h.Version is not 2 and not 3)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, $"qcow2 version {h.Version} is not supported", 4);
        h.BackingFileOffset = BinaryPrimitives.ReadUInt64BigEndian(buf[8..]);
        h.BackingFileSize = BinaryPrimitives.ReadUInt32BigEndian(buf[16..]);
        uint cb = BinaryPrimitives.ReadUInt32BigEndian(buf[20..]);
        if (cb < Qcow2Const.MinClusterBits || cb > Qcow2Const.MaxClusterBits)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"cluster_bits {cb} outside {Qcow2Const.MinClusterBits}..{Qcow2Const.MaxClusterBits}", 20);
        h.ClusterBits = (int)cb;
        h.Size = BinaryPrimitives.ReadUInt64BigEndian(buf[24..]);
        h.CryptMethod = BinaryPrimitives.ReadUInt32BigEndian(buf[32..]);
        h.L1Size = BinaryPrimitives.ReadUInt32BigEndian(buf[36..]);
        h.L1TableOffset = BinaryPrimitives.ReadUInt64BigEndian(buf[40..]);
        h.RefcountTableOffset = BinaryPrimitives.ReadUInt64BigEndian(buf[48..]);
        h.RefcountTableClusters = BinaryPrimitives.ReadUInt32BigEndian(buf[56..]);
        h.NbSnapshots = BinaryPrimitives.ReadUInt32BigEndian(buf[60..]);
        h.SnapshotsOffset = BinaryPrimitives.ReadUInt64BigEndian(buf[64..]);
        if (h.Version >= 3)
        {
            if (buf.Length < Qcow2Const.V3MinHeaderLength)
                ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, "truncated version 3 header", 0);
            h.Incompatible = BinaryPrimitives.ReadUInt64BigEndian(buf[72..]);
            h.Compatible = BinaryPrimitives.ReadUInt64BigEndian(buf[80..]);
            h.Autoclear = BinaryPrimitives.ReadUInt64BigEndian(buf[88..]);
            uint ro = BinaryPrimitives.ReadUInt32BigEndian(buf[96..]);
            if (ro > 6) ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"refcount_order {ro} > 6", 96);
            h.RefcountOrder = (int)ro;
            h.HeaderLength = BinaryPrimitives.ReadUInt32BigEndian(buf[100..]);
            // qcow2.txt: header_length is at least 104 and a multiple of 8 from v3 on; it must fit in cluster 0.
            if (h.HeaderLength < Qcow2Const.V3MinHeaderLength || h.HeaderLength > (uint)Math.Min(buf.Length, h.ClusterSize) || h.HeaderLength % 8 != 0 && h.HeaderLength != 104)
                ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"header_length {h.HeaderLength} invalid", 100);
            if (h.HeaderLength > 104) h.CompressionType = buf[104];
        }
        int cs = h.ClusterSize;
        ulong fileLen = (ulong)Math.Max(0, fileLength);

        // Extensions sit between the header and the end of cluster 0 (or the backing name).
        int extStart = (int)h.HeaderLength;
        int extLimit = Math.Min(buf.Length, cs);
        if (h.BackingFileOffset != 0 && h.BackingFileOffset < (ulong)extLimit) extLimit = (int)h.BackingFileOffset;
        ParseExtensions(h, buf[..extLimit], extStart, path);

        // Feature bits: refuse unknown incompatible features by name (qcow2.txt "incompatible_features").
        ulong unknown = h.Incompatible & ~Qcow2Const.IncompatKnown;
        if (unknown != 0)
        {
            int bit = System.Numerics.BitOperations.TrailingZeroCount(unknown);
            string name = h.FeatureName(0, bit) ?? $"unknown incompatible feature bit {bit}";
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, $"unsupported qcow2 feature: {name}", 72);
        }
        if ((h.Incompatible & Qcow2Const.IncompatDataFile) != 0)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, "unsupported qcow2 feature: external data file", 72);
        if (h.CryptMethod != 0)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, $"unsupported qcow2 feature: encryption (crypt_method {h.CryptMethod})", 32);
        if ((h.Incompatible & Qcow2Const.IncompatCompression) != 0 ? h.CompressionType > 1 : h.CompressionType != 0)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, $"unsupported qcow2 compression type {h.CompressionType}", 104);
        if (h.ExtendedL2 && h.ClusterBits < 14)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, "extended L2 entries need clusters of at least 16 KiB", 20);

        if (h.Size > Qcow2Const.MaxVirtualSize)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"virtual size {h.Size} too large", 24);
        // L1 must cover the virtual size, and fit our cap.
        ulong bytesPerL1 = 1UL << (h.ClusterBits + h.L2Bits);
        ulong needL1 = (h.Size + bytesPerL1 - 1) / bytesPerL1;
        if (h.L1Size < needL1)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, path, $"L1 table too small ({h.L1Size} entries for size {h.Size})", 36);
        if ((ulong)h.L1Size * 8 > Qcow2Const.MaxL1Bytes)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"L1 table of {h.L1Size} entries is too large", 36);
        CheckTable(h.L1TableOffset, (ulong)h.L1Size * 8, cs, fileLen, path, "L1 table", 40, h.L1Size != 0);
        if (h.RefcountTableClusters == 0 || (ulong)h.RefcountTableClusters << h.ClusterBits > Qcow2Const.MaxRefTableBytes)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"refcount table of {h.RefcountTableClusters} clusters invalid", 56);
        CheckTable(h.RefcountTableOffset, (ulong)h.RefcountTableClusters << h.ClusterBits, cs, fileLen, path, "refcount table", 48, true);
        if (h.NbSnapshots > Qcow2Const.MaxSnapshots)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"{h.NbSnapshots} snapshots is too many", 60);
        if (h.NbSnapshots > 0)
            CheckTable(h.SnapshotsOffset, 40, cs, fileLen, path, "snapshot table", 64, true);

        if (h.BackingFileOffset != 0)
        {
            if (h.BackingFileSize == 0 || h.BackingFileSize > Qcow2Const.MaxBackingNameLength)
                ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"backing file name length {h.BackingFileSize} invalid", 16);
            // qcow2.txt: the name lives in the first cluster.
            ulong end = h.BackingFileOffset + h.BackingFileSize;
            if (end > (ulong)cs || end > (ulong)buf.Length || h.BackingFileOffset < Qcow2Const.V2HeaderLength)
                ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, "backing file name outside the header cluster", 8);
            h.BackingFile = Encoding.UTF8.GetString(buf.Slice((int)h.BackingFileOffset, (int)h.BackingFileSize));
        }
        return h;
    }

    private static void CheckTable(ulong offset, ulong bytes, int cs, ulong fileLen, string path, string what, long field, bool required)
    {
        if (!required) return;
        if (offset == 0 || offset % (ulong)cs != 0)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, path, $"{what} offset 0x{offset:x} invalid", field);
        ulong end = offset + bytes;
        if (end < offset || end > fileLen + (ulong)cs) // allow the last cluster to be short, as QEMU does
            ThrowHelper.Throw(ImageErrorKind.Corrupt, path, $"{what} at 0x{offset:x} extends past end of file", (long)Math.Min(offset, long.MaxValue));
    }

    private static void ParseExtensions(Qcow2Header h, ReadOnlySpan<byte> buf, int pos, string path)
    {
        // qcow2.txt "Header extensions": type u32, length u32, data padded to 8 bytes; type 0 ends the list.
        int guard = 0;
        while (pos + 8 <= buf.Length)
        {
            if (++guard > 4096) ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, "too many header extensions", pos);
            uint type = BinaryPrimitives.ReadUInt32BigEndian(buf[pos..]);
            uint len = BinaryPrimitives.ReadUInt32BigEndian(buf[(pos + 4)..]);
            if (type == Qcow2Const.ExtEnd) return;
            int data = pos + 8;
            if (len > (uint)(buf.Length - data))
                ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"header extension 0x{type:x8} overruns the header cluster", pos);
            var d = buf.Slice(data, (int)len);
            switch (type)
            {
                case Qcow2Const.ExtBackingFormat:
                    h.BackingFormat = Encoding.UTF8.GetString(d).TrimEnd('\0');
                    break;
                case Qcow2Const.ExtFeatureTable:
                    for (int i = 0; i + 48 <= d.Length; i += 48)
                    {
                        var name = d.Slice(i + 2, 46);
                        int z = name.IndexOf((byte)0);
                        h.FeatureNames.Add((d[i], d[i + 1], Encoding.UTF8.GetString(z < 0 ? name : name[..z])));
                    }
                    break;
                case Qcow2Const.ExtBitmaps:
                    h.HasBitmapsExtension = true; // bitmaps are ignored; a writer clears the autoclear bit
                    break;
                case Qcow2Const.ExtCrypto:
                    ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, "unsupported qcow2 feature: encryption (LUKS header)", pos);
                    break;
                case Qcow2Const.ExtDataFile:
                    ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, "unsupported qcow2 feature: external data file", pos);
                    break;
                default:
                    h.UnknownExtensions.Add((type, d.ToArray()));
                    break;
            }
            ulong next = (ulong)data + ((len + 7UL) & ~7UL);
            if (next > (ulong)buf.Length) return;
            pos = (int)next;
        }
    }

    public string? FeatureName(int type, int bit)
    {
        foreach (var f in FeatureNames) if (f.Type == type && f.Bit == bit) return f.Name;
        return (type, bit) switch
        {
            (0, 0) => "dirty bit",
            (0, 1) => "corrupt bit",
            (0, 2) => "external data file",
            (0, 3) => "compression type",
            (0, 4) => "extended L2 entries",
            _ => null,
        };
    }

    /// <summary>Serialises header, extensions and backing name into <paramref name="cluster"/> (which must be zeroed).</summary>
    public void Write(Span<byte> cluster, bool writeFeatureTable = true)
    {
        BinaryPrimitives.WriteUInt32BigEndian(cluster, Qcow2Const.Magic);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[4..], Version);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[20..], (uint)ClusterBits);
        BinaryPrimitives.WriteUInt64BigEndian(cluster[24..], Size);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[32..], CryptMethod);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[36..], L1Size);
        BinaryPrimitives.WriteUInt64BigEndian(cluster[40..], L1TableOffset);
        BinaryPrimitives.WriteUInt64BigEndian(cluster[48..], RefcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[56..], RefcountTableClusters);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[60..], NbSnapshots);
        BinaryPrimitives.WriteUInt64BigEndian(cluster[64..], SnapshotsOffset);
        int pos;
        if (Version >= 3)
        {
            HeaderLength = 112;
            BinaryPrimitives.WriteUInt64BigEndian(cluster[72..], Incompatible);
            BinaryPrimitives.WriteUInt64BigEndian(cluster[80..], Compatible);
            BinaryPrimitives.WriteUInt64BigEndian(cluster[88..], Autoclear);
            BinaryPrimitives.WriteUInt32BigEndian(cluster[96..], (uint)RefcountOrder);
            BinaryPrimitives.WriteUInt32BigEndian(cluster[100..], HeaderLength);
            cluster[104] = CompressionType;
            pos = 112;
        }
        else pos = Qcow2Const.V2HeaderLength;

        if (BackingFormat is not null)
            pos = WriteExt(cluster, pos, Qcow2Const.ExtBackingFormat, Encoding.UTF8.GetBytes(BackingFormat));
        // The feature name table is optional (qcow2.txt "Feature name table"); with 512-byte clusters it
        // may not fit next to a backing name, and then it is left out, as QEMU does.
        int backingLen = BackingFile is null ? 0 : Encoding.UTF8.GetByteCount(BackingFile);
        int unknownLen = 0;
        foreach (var (_, d) in UnknownExtensions) unknownLen += 8 + ((d.Length + 7) & ~7);
        if (pos + 8 + 8 * 48 + unknownLen + 8 + backingLen > cluster.Length) writeFeatureTable = false;
        if (Version >= 3 && writeFeatureTable)
        {
            (int, int, string)[] names =
            {
                (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
                (0, 3, "compression type"), (0, 4, "extended L2 entries"),
                (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
            };
            var table = new byte[names.Length * 48];
            for (int i = 0; i < names.Length; i++)
            {
                table[i * 48] = (byte)names[i].Item1;
                table[i * 48 + 1] = (byte)names[i].Item2;
                Encoding.ASCII.GetBytes(names[i].Item3).CopyTo(table, i * 48 + 2);
            }
            pos = WriteExt(cluster, pos, Qcow2Const.ExtFeatureTable, table);
        }
        foreach (var (t, d) in UnknownExtensions) pos = WriteExt(cluster, pos, t, d);
        pos += 8; // end-of-extensions marker (zeros)
        if (BackingFile is not null)
        {
            byte[] name = Encoding.UTF8.GetBytes(BackingFile);
            if (name.Length > Qcow2Const.MaxBackingNameLength || pos + name.Length > cluster.Length)
                ThrowHelper.Throw(ImageErrorKind.InvalidArgument, BackingFile, "backing file name too long");
            BackingFileOffset = (ulong)pos;
            BackingFileSize = (uint)name.Length;
            name.CopyTo(cluster[pos..]);
        }
        else { BackingFileOffset = 0; BackingFileSize = 0; }
        BinaryPrimitives.WriteUInt64BigEndian(cluster[8..], BackingFileOffset);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[16..], BackingFileSize);
    }

    private static int WriteExt(Span<byte> c, int pos, uint type, ReadOnlySpan<byte> data)
    {
        int need = pos + 8 + ((data.Length + 7) & ~7) + 8;
        if (need > c.Length) ThrowHelper.Throw(ImageErrorKind.InvalidArgument, null, "header extensions do not fit in the first cluster");
        BinaryPrimitives.WriteUInt32BigEndian(c[pos..], type);
        BinaryPrimitives.WriteUInt32BigEndian(c[(pos + 4)..], (uint)data.Length);
        data.CopyTo(c[(pos + 8)..]);
        return pos + 8 + ((data.Length + 7) & ~7);
    }
}
