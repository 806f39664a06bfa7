namespace KvmSharp.Devices.Virtio;

/// <summary>Helpers for device-specific configuration space.</summary>
internal static class VirtioConfigSpace
{
    /// <summary>Copies the window [offset, offset + data.Length) of <paramref name="config"/>
    /// into <paramref name="data"/>; bytes beyond the structure read as 0 (IVirtioDevice.ReadConfig).</summary>
    public static void Read(ReadOnlySpan<byte> config, ulong offset, Span<byte> data)
    {
        data.Clear();
        if (offset >= (ulong)config.Length)
            return;
        ReadOnlySpan<byte> src = config[(int)offset..];
        src[..Math.Min(src.Length, data.Length)].CopyTo(data);
    }
}
