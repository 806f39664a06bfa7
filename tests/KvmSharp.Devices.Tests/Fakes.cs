namespace KvmSharp.Devices.Tests;

/// <summary>An interrupt line that counts edges.</summary>
internal sealed class CountingLine : IInterruptLine
{
    private int _count;

    public int Count => Volatile.Read(ref _count);

    public void Trigger() => Interlocked.Increment(ref _count);
}

/// <summary>A device that remembers its last access and reads back a pattern derived from the offset.</summary>
internal sealed class RecordingDevice(byte tag) : IBusDevice
{
    public ulong LastOffset { get; private set; } = ulong.MaxValue;
    public byte[] LastWrite { get; private set; } = [];
    public int Reads;
    public int Writes;

    public void Read(ulong offset, Span<byte> data)
    {
        LastOffset = offset;
        Interlocked.Increment(ref Reads);
        for (int i = 0; i < data.Length; i++)
            data[i] = (byte)(tag + offset + (ulong)i);
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        LastOffset = offset;
        LastWrite = data.ToArray();
        Interlocked.Increment(ref Writes);
    }
}

/// <summary>A device that reads back its tag and nothing else: safe to call from many threads.</summary>
internal sealed class TagDevice(byte tag) : IBusDevice
{
    public void Read(ulong offset, Span<byte> data) => data.Fill(tag);

    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
    }
}

/// <summary>A manually advanced clock for rate limiting.</summary>
internal sealed class ManualTime : TimeProvider
{
    public long Ticks;

    public override long TimestampFrequency => TimeSpan.TicksPerSecond;

    public override long GetTimestamp() => Ticks;

    public void Advance(TimeSpan by) => Ticks += by.Ticks;
}

/// <summary>A level line that remembers its state and counts changes.</summary>
internal sealed class RecordingLevelLine : ILevelInterruptLine
{
    private int _changes;
    private int _asserted;

    public bool Asserted => Volatile.Read(ref _asserted) != 0;

    public int Changes => Volatile.Read(ref _changes);

    public void SetLevel(bool asserted)
    {
        Assert.NotEqual(asserted, Asserted); // called only on a change
        Volatile.Write(ref _asserted, asserted ? 1 : 0);
        Interlocked.Increment(ref _changes);
    }
}
