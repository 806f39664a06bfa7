using System.Buffers.Binary;
using System.Text;

namespace KvmSharp.Images.Qcow2;

/// <summary>One internal snapshot (qcow2.txt "Snapshot table entry"); we list them and count their clusters.</summary>
internal sealed record Qcow2Snapshot(string Id, string Name, ulong L1Offset, uint L1Size, uint DateSec, uint DateNsec,
    ulong VmClockNsec, ulong VmStateSize, ulong DiskSize, ulong Icount);

internal static class Qcow2Snapshots
{
    /// <summary>QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA: qemu refuses to open an image with a larger entry.</summary>
    public const uint MaxExtraData = 1024;

    /// <summary>QEMU's QCOW_MAX_SNAPSHOTS_SIZE (1 KiB per snapshot): bounds what parsing the table reads and keeps.</summary>
    public const ulong MaxTableBytes = 1024UL * Qcow2Const.MaxSnapshots;

    /// <summary>Parses the snapshot table; returns the entries and the table's byte length.</summary>
    /// <param name="validateOnly">Check every entry as qemu's qcow2_read_snapshots does at open, keep nothing.</param>
    public static List<Qcow2Snapshot> Read(Qcow2Image img, out ulong tableBytes, bool validateOnly = false)
    {
        var h = img.Header;
        var list = new List<Qcow2Snapshot>();
        tableBytes = 0;
        if (h.NbSnapshots == 0) return list;
        ulong pos = h.SnapshotsOffset;
        ulong fileEnd = img.FileEnd;
        var fixedPart = new byte[40];
        for (uint i = 0; i < h.NbSnapshots; i++)
        {
            if (pos + 40 > fileEnd || pos + 40 < pos)
                ThrowHelper.Throw(ImageErrorKind.Corrupt, img.Path, $"snapshot {i} lies beyond the end of the file", (long)Math.Min(pos, long.MaxValue));
            img.ReadHost(fixedPart, pos);
            ulong l1 = BinaryPrimitives.ReadUInt64BigEndian(fixedPart);
            uint l1Size = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(8));
            ushort idLen = BinaryPrimitives.ReadUInt16BigEndian(fixedPart.AsSpan(12));
            ushort nameLen = BinaryPrimitives.ReadUInt16BigEndian(fixedPart.AsSpan(14));
            uint dateSec = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(16));
            uint dateNsec = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(20));
            ulong clock = BinaryPrimitives.ReadUInt64BigEndian(fixedPart.AsSpan(24));
            uint vmState = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(32));
            uint extraLen = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(36));
            // qcow2.txt "Snapshot table entry", extra_data_size; QEMU refuses the open past 1024 bytes.
            if (extraLen > MaxExtraData)
                ThrowHelper.Throw(ImageErrorKind.Corrupt, img.Path, $"Too much extra metadata in snapshot table entry {i} ({extraLen} > {MaxExtraData} bytes)", (long)pos);
            ulong varLen = extraLen + (ulong)idLen + nameLen;
            if (pos + 40 + varLen - h.SnapshotsOffset > MaxTableBytes)
                ThrowHelper.Throw(ImageErrorKind.Corrupt, img.Path, "Snapshot table is too big", (long)h.SnapshotsOffset);
            if (pos + 40 + varLen > fileEnd)
                ThrowHelper.Throw(ImageErrorKind.Corrupt, img.Path, $"snapshot {i} lies beyond the end of the file", (long)pos);
            if (validateOnly)
            {
                pos += (40 + varLen + 7) & ~7UL;
                continue;
            }
            var v = new byte[varLen];
            img.ReadHost(v, pos + 40);
            ulong vmStateLarge = vmState, diskSize = h.Size, icount = ulong.MaxValue;
            if (extraLen >= 8) vmStateLarge = BinaryPrimitives.ReadUInt64BigEndian(v);
            if (extraLen >= 16) diskSize = BinaryPrimitives.ReadUInt64BigEndian(v.AsSpan(8));
            if (extraLen >= 24) icount = BinaryPrimitives.ReadUInt64BigEndian(v.AsSpan(16));
            string id = Encoding.UTF8.GetString(v, (int)extraLen, idLen);
            string name = Encoding.UTF8.GetString(v, (int)extraLen + idLen, nameLen);
            if ((ulong)l1Size * 8 > Qcow2Const.MaxL1Bytes)
                ThrowHelper.Throw(ImageErrorKind.Corrupt, img.Path, $"snapshot {id} L1 table too large", (long)pos);
            list.Add(new Qcow2Snapshot(id, name, l1, l1Size, dateSec, dateNsec, clock, vmStateLarge, diskSize, icount));
            pos += (40 + varLen + 7) & ~7UL;
        }
        tableBytes = pos - h.SnapshotsOffset;
        return list;
    }
}
