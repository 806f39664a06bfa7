using System.Buffers.Binary;
using System.Text;

namespace KvmSharp.Images.Qcow2;

/// <summary>The qcow2 header (qcow2.txt "Header"), parsed and validated, and written back.</summary>
internal sealed class Qcow2Header
{
    /// <summary>Byte offsets of the header fields (qcow2.txt "Header", big endian; names as there).</summary>
    public static class Field
    {
        public const int Magic = 0;
        public const int Version = 4;
        public const int BackingFileOffset = 8;
        public const int BackingFileSize = 16;
        public const int ClusterBits = 20;
        public const int Size = 24;
        public const int CryptMethod = 32;
        public const int L1Size = 36;
        public const int L1TableOffset = 40;
        public const int RefcountTableOffset = 48;
        public const int RefcountTableClusters = 56;
        public const int NbSnapshots = 60;
        public const int SnapshotsOffset = 64;
        // Version 3 and later:
        public const int IncompatibleFeatures = 72;
        public const int CompatibleFeatures = 80;
        public const int AutoclearFeatures = 88;
        public const int RefcountOrder = 96;
        public const int HeaderLength = 100;
        public const int CompressionType = 104;
    }

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
        h.Version = BinaryPrimitives.ReadUInt32BigEndian(buf[Field.Version..]);
        if (h.Version is not 2 and not 3)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, $"qcow2 version {h.Version} is not supported", Field.Version);
        h.BackingFileOffset = BinaryPrimitives.ReadUInt64BigEndian(buf[Field.BackingFileOffset..]);
        h.BackingFileSize = BinaryPrimitives.ReadUInt32BigEndian(buf[Field.BackingFileSize..]);
        uint cb = BinaryPrimitives.ReadUInt32BigEndian(buf[Field.ClusterBits..]);
        if (cb < Qcow2Const.MinClusterBits || cb > Qcow2Const.MaxClusterBits)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"cluster_bits {cb} outside {Qcow2Const.MinClusterBits}..{Qcow2Const.MaxClusterBits}", Field.ClusterBits);
        h.ClusterBits = (int)cb;
        h.Size = BinaryPrimitives.ReadUInt64BigEndian(buf[Field.Size..]);
        h.CryptMethod = BinaryPrimitives.ReadUInt32BigEndian(buf[Field.CryptMethod..]);
        h.L1Size = BinaryPrimitives.ReadUInt32BigEndian(buf[Field.L1Size..]);
        h.L1TableOffset = BinaryPrimitives.ReadUInt64BigEndian(buf[Field.L1TableOffset..]);
        h.RefcountTableOffset = BinaryPrimitives.ReadUInt64BigEndian(buf[Field.RefcountTableOffset..]);
        h.RefcountTableClusters = BinaryPrimitives.ReadUInt32BigEndian(buf[Field.RefcountTableClusters..]);
        h.NbSnapshots = BinaryPrimitives.ReadUInt32BigEndian(buf[Field.NbSnapshots..]);
        h.SnapshotsOffset = BinaryPrimitives.ReadUInt64BigEndian(buf[Field.SnapshotsOffset..]);
        if (h.Version >= 3)
        {
            if (buf.Length < Qcow2Const.V3MinHeaderLength)
                ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, "truncated version 3 header", 0);
            h.Incompatible = BinaryPrimitives.ReadUInt64BigEndian(buf[Field.IncompatibleFeatures..]);
            h.Compatible = BinaryPrimitives.ReadUInt64BigEndian(buf[Field.CompatibleFeatures..]);
            h.Autoclear = BinaryPrimitives.ReadUInt64BigEndian(buf[Field.AutoclearFeatures..]);
            uint ro = BinaryPrimitives.ReadUInt32BigEndian(buf[Field.RefcountOrder..]);
            if (ro > 6) ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"refcount_order {ro} > 6", Field.RefcountOrder);
            h.RefcountOrder = (int)ro;
            h.HeaderLength = BinaryPrimitives.ReadUInt32BigEndian(buf[Field.HeaderLength..]);
            // qcow2.txt: header_length is at least 104 and a multiple of 8 from v3 on; it must fit in cluster 0.
            if (h.HeaderLength < Qcow2Const.V3MinHeaderLength || h.HeaderLength > (uint)Math.Min(buf.Length, h.ClusterSize) || h.HeaderLength % 8 != 0 && h.HeaderLength != 104)
                ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"header_length {h.HeaderLength} invalid", Field.HeaderLength);
            if (h.HeaderLength > 104) h.CompressionType = buf[Field.CompressionType];
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
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, $"unsupported qcow2 feature: {name}", Field.IncompatibleFeatures);
        }
        if ((h.Incompatible & Qcow2Const.IncompatDataFile) != 0)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, "unsupported qcow2 feature: external data file", Field.IncompatibleFeatures);
        if (h.CryptMethod != 0)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, $"unsupported qcow2 feature: encryption (crypt_method {h.CryptMethod})", Field.CryptMethod);
        if ((h.Incompatible & Qcow2Const.IncompatCompression) != 0 ? h.CompressionType > 1 : h.CompressionType != 0)
            ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, $"unsupported qcow2 compression type {h.CompressionType}", Field.CompressionType);
        if (h.ExtendedL2 && h.ClusterBits < 14)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, "extended L2 entries need clusters of at least 16 KiB", Field.ClusterBits);

        if (h.Size > Qcow2Const.MaxVirtualSize)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"virtual size {h.Size} too large", Field.Size);
        // L1 must cover the virtual size, and fit our cap.
        ulong bytesPerL1 = 1UL << (h.ClusterBits + h.L2Bits);
        ulong needL1 = (h.Size + bytesPerL1 - 1) / bytesPerL1;
        if (h.L1Size < needL1)
            ThrowHelper.Throw(ImageErrorKind.Corrupt, path, $"L1 table too small ({h.L1Size} entries for size {h.Size})", Field.L1Size);
        if ((ulong)h.L1Size * 8 > Qcow2Const.MaxL1Bytes)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"L1 table of {h.L1Size} entries is too large", Field.L1Size);
        CheckTable(h.L1TableOffset, (ulong)h.L1Size * 8, cs, fileLen, path, "L1 table", 40, h.L1Size != 0);
        if (h.RefcountTableClusters == 0 || (ulong)h.RefcountTableClusters << h.ClusterBits > Qcow2Const.MaxRefTableBytes)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"refcount table of {h.RefcountTableClusters} clusters invalid", Field.RefcountTableClusters);
        CheckTable(h.RefcountTableOffset, (ulong)h.RefcountTableClusters << h.ClusterBits, cs, fileLen, path, "refcount table", 48, true);
        if (h.NbSnapshots > Qcow2Const.MaxSnapshots)
            ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"{h.NbSnapshots} snapshots is too many", Field.NbSnapshots);
        if (h.NbSnapshots > 0)
            CheckTable(h.SnapshotsOffset, 40, cs, fileLen, path, "snapshot table", 64, true);

        if (h.BackingFileOffset != 0)
        {
            if (h.BackingFileSize == 0 || h.BackingFileSize > Qcow2Const.MaxBackingNameLength)
                ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, $"backing file name length {h.BackingFileSize} invalid", Field.BackingFileSize);
            // qcow2.txt: the name lives in the first cluster.
            ulong end = h.BackingFileOffset + h.BackingFileSize;
            if (end > (ulong)cs || end > (ulong)buf.Length || h.BackingFileOffset < Qcow2Const.V2HeaderLength)
                ThrowHelper.Throw(ImageErrorKind.InvalidFormat, path, "backing file name outside the header cluster", Field.BackingFileOffset);
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
        BinaryPrimitives.WriteUInt32BigEndian(cluster[Field.Version..], Version);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[Field.ClusterBits..], (uint)ClusterBits);
        BinaryPrimitives.WriteUInt64BigEndian(cluster[Field.Size..], Size);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[Field.CryptMethod..], CryptMethod);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[Field.L1Size..], L1Size);
        BinaryPrimitives.WriteUInt64BigEndian(cluster[Field.L1TableOffset..], L1TableOffset);
        BinaryPrimitives.WriteUInt64BigEndian(cluster[Field.RefcountTableOffset..], RefcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[Field.RefcountTableClusters..], RefcountTableClusters);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[Field.NbSnapshots..], NbSnapshots);
        BinaryPrimitives.WriteUInt64BigEndian(cluster[Field.SnapshotsOffset..], SnapshotsOffset);
        int pos;
        if (Version >= 3)
        {
            HeaderLength = 112;
            BinaryPrimitives.WriteUInt64BigEndian(cluster[Field.IncompatibleFeatures..], Incompatible);
            BinaryPrimitives.WriteUInt64BigEndian(cluster[Field.CompatibleFeatures..], Compatible);
            BinaryPrimitives.WriteUInt64BigEndian(cluster[Field.AutoclearFeatures..], Autoclear);
            BinaryPrimitives.WriteUInt32BigEndian(cluster[Field.RefcountOrder..], (uint)RefcountOrder);
            BinaryPrimitives.WriteUInt32BigEndian(cluster[Field.HeaderLength..], HeaderLength);
            cluster[Field.CompressionType] = CompressionType;
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
        BinaryPrimitives.WriteUInt64BigEndian(cluster[Field.BackingFileOffset..], BackingFileOffset);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[Field.BackingFileSize..], BackingFileSize);
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
