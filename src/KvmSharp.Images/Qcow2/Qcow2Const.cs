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
