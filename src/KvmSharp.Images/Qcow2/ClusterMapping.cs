namespace KvmSharp.Images.Qcow2;

/// <summary>
/// Where the data of a guest read comes from, as the L2 entry of its cluster says (qcow2.txt "Cluster
/// mapping"); the read path plans by it which part runs under the image lock.
/// </summary>
internal enum ClusterMapping
{
    /// <summary>No host cluster and no backing file: reads as zeros.</summary>
    Unallocated,

    /// <summary>The zero flag (version 3): reads as zeros.</summary>
    Zero,

    /// <summary>A standard host cluster: the data is read from the image file (outside the lock).</summary>
    Allocated,

    /// <summary>A compressed cluster: read and decompressed under the lock (one cached cluster).</summary>
    Compressed,

    /// <summary>An extended L2 entry: each subcluster is allocated, zero or from the backing file.</summary>
    Subclusters,

    /// <summary>No host cluster: the data is read from the backing file (outside the lock).</summary>
    Backing,
}
