namespace KvmSharp.Images.Qcow2;

/// <summary>
/// The reference counts <c>check</c> computes from the metadata, laid out exactly like the image's refcount
/// blocks (qcow2.txt "Host cluster management": same entry width, one page per refcount block) and allocated
/// only for ranges that hold a reference. Memory follows the referenced clusters: at worst what qemu-img's
/// flat array over the file's cluster count takes (qcow2-refcount.c calculate_refcounts), never the
/// virtual size; a page and its refcount block on disk compare as two byte spans.
/// </summary>
internal sealed class RefcountMap
{
    private readonly byte[]?[] _pages;
    private readonly int _order;
    private readonly int _pageBytes;

    /// <summary>log2(entries per page) = log2(refcounts per refcount block).</summary>
    public int PageBits { get; }

    /// <summary>Clusters covered: the image file's length in clusters.</summary>
    public ulong Clusters { get; }

    /// <summary>Largest count an entry holds (2^refcount_bits - 1); counting past it is an overflow error.</summary>
    public ulong Max { get; }

    public RefcountMap(ulong clusters, int clusterBits, int refcountOrder)
    {
        Clusters = clusters;
        _order = refcountOrder;
        _pageBytes = 1 << clusterBits;
        PageBits = clusterBits + 3 - refcountOrder;
        _pages = new byte[]?[(clusters + (1UL << PageBits) - 1) >> PageBits];
        Max = RefcountBlock.MaxRefcount(refcountOrder);
    }

    public ulong PageCount => (ulong)_pages.Length;

    /// <summary>The counts for refcount-table index <paramref name="page"/>; empty when none is referenced.</summary>
    public ReadOnlySpan<byte> Page(ulong page) => _pages[page];

    public ulong Get(ulong cluster)
    {
        byte[]? p = _pages[cluster >> PageBits];
        return p is null ? 0 : RefcountBlock.Get(p, cluster & ((1UL << PageBits) - 1), _order);
    }

    /// <summary>Counts one more reference; false (count unchanged) when it is already <see cref="Max"/>.</summary>
    public bool Increment(ulong cluster)
    {
        ref byte[]? p = ref _pages[cluster >> PageBits];
        p ??= new byte[_pageBytes];
        ulong i = cluster & ((1UL << PageBits) - 1);
        ulong v = RefcountBlock.Get(p, i, _order);
        if (v == Max) return false;
        RefcountBlock.Set(p, i, _order, v + 1);
        return true;
    }
}
