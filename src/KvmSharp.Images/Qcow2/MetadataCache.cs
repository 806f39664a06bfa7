namespace KvmSharp.Images.Qcow2;

/// <summary>
/// Fixed set of cluster-sized slots for L2 tables or refcount blocks, keyed by host offset, LRU eviction.
/// All memory is allocated up front, so lookups and misses allocate nothing (Dictionary is pre-sized).
/// Not thread-safe: the owning image's lock covers it.
/// </summary>
internal sealed class MetadataCache
{
    private readonly byte[] _data;
    private readonly ulong[] _offset; // 0 = empty slot
    private readonly bool[] _dirty;
    private readonly long[] _used;
    private readonly Dictionary<ulong, int> _index;
    private readonly int _clusterSize;
    private long _tick;
    private int _last = -1;

    public int Slots { get; }
    public int DirtyCount { get; private set; }

    public MetadataCache(int slots, int clusterSize)
    {
        Slots = slots;
        _clusterSize = clusterSize;
        _data = new byte[(long)slots * clusterSize];
        _offset = new ulong[slots];
        _dirty = new bool[slots];
        _used = new long[slots];
        _index = new Dictionary<ulong, int>(slots * 2);
    }

    public Span<byte> Span(int slot) => _data.AsSpan(slot * _clusterSize, _clusterSize);
    public ulong OffsetOf(int slot) => _offset[slot];
    public bool IsDirty(int slot) => _dirty[slot];

    public int Find(ulong offset)
    {
        int l = _last;
        if (l >= 0 && _offset[l] == offset) { _used[l] = ++_tick; return l; }
        if (_index.TryGetValue(offset, out int s)) { _used[s] = ++_tick; _last = s; return s; }
        return -1;
    }

    /// <summary>The least recently used slot (empty slots first); the caller writes it back if dirty.</summary>
    /// <remarks>Clean slots are preferred: evicting a dirty one costs the owner an ordered metadata flush
    /// (with fsyncs), after which every slot is clean again.</remarks>
    public int Victim()
    {
        int best = -1, bestDirty = 0;
        long bestUse = long.MaxValue, bestDirtyUse = long.MaxValue;
        for (int i = 0; i < Slots; i++)
        {
            if (_offset[i] == 0) return i;
            if (_dirty[i])
            {
                if (_used[i] < bestDirtyUse) { bestDirtyUse = _used[i]; bestDirty = i; }
            }
            else if (_used[i] < bestUse) { bestUse = _used[i]; best = i; }
        }
        return best >= 0 ? best : bestDirty;
    }

    public void Assign(int slot, ulong offset)
    {
        if (_offset[slot] != 0) _index.Remove(_offset[slot]);
        if (_dirty[slot]) { _dirty[slot] = false; DirtyCount--; }
        _offset[slot] = offset;
        _index[offset] = slot;
        _used[slot] = ++_tick;
        _last = slot;
    }

    public void MarkDirty(int slot)
    {
        if (!_dirty[slot]) { _dirty[slot] = true; DirtyCount++; }
    }

    public void MarkClean(int slot)
    {
        if (_dirty[slot]) { _dirty[slot] = false; DirtyCount--; }
    }

    public void Invalidate(ulong offset)
    {
        if (_index.TryGetValue(offset, out int s))
        {
            _index.Remove(offset);
            MarkClean(s);
            _offset[s] = 0;
            if (_last == s) _last = -1;
        }
    }
}
