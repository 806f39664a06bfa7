using KvmSharp.Memory;

namespace KvmSharp.Boot;

/// <summary>
/// An initial ramdisk: an open regular file, read straight into guest memory when it is loaded (no
/// copy in the VMM's heap, whatever its size), or bytes already in memory (tests, API clients).
/// </summary>
public sealed class InitrdImage : IDisposable
{
    /// <summary>Guest RAM is mapped in 4 KiB pages; a read never asks for more than this in one call.</summary>
    private const int ChunkBytes = 1 << 30;

    private readonly FileStream? _file;
    private readonly byte[]? _bytes;

    private InitrdImage(string name, ulong size, FileStream? file, byte[]? bytes)
    {
        Name = name;
        Size = size;
        _file = file;
        _bytes = bytes;
    }

    /// <summary>The file name or label used in messages.</summary>
    public string Name { get; }

    /// <summary>Length in bytes (fstat's, for a file: fixed when it was opened).</summary>
    public ulong Size { get; }

    /// <summary>
    /// Opens an initrd file without reading it. Its length is checked first against
    /// <paramref name="maxBytes"/>, the guest RAM it could be placed in; the precise placement (above the
    /// kernel, below initrd_addr_max) is checked by <see cref="LinuxLoader.Load"/>.
    /// </summary>
    /// <exception cref="BootException">Missing, unreadable, a pipe or device, empty, or larger than <paramref name="maxBytes"/>.</exception>
    public static InitrdImage Open(string path, ulong maxBytes = ulong.MaxValue)
    {
        var f = BootFile.Open(path, "initrd");
        ulong size = (ulong)f.Length;
        if (size > maxBytes)
        {
            f.Dispose();
            throw new BootException($"Memory is too small for the initrd file {path}: it is {size} bytes, more than the {maxBytes >> 20} MiB of guest RAM it could be placed in.");
        }
        return new InitrdImage(path, size, f, null);
    }

    /// <summary>An initrd held in memory.</summary>
    public static InitrdImage FromBytes(byte[] data, string name = "initrd")
    {
        ArgumentNullException.ThrowIfNull(data);
        return new InitrdImage(name, (ulong)data.Length, null, data);
    }

    /// <summary>Lets tests and callers write <c>Initrd = bytes</c>; null stays null.</summary>
    public static implicit operator InitrdImage?(byte[]? data) => data is null ? null : FromBytes(data);

    /// <summary>Copies the initrd to guest memory at <paramref name="address"/>, which the caller has checked holds <see cref="Size"/> bytes.</summary>
    /// <exception cref="BootException">The file shrank or could not be read.</exception>
    internal void CopyTo(GuestMemory memory, GuestAddress address)
    {
        if (_bytes is not null)
        {
            memory.Write(address, _bytes);
            return;
        }
        ulong done = 0;
        while (done < Size)
        {
            int chunk = (int)Math.Min(Size - done, ChunkBytes);
            if (!memory.TryGetSpan(new GuestAddress(address.Value + done), chunk, out var span))
                throw new BootException($"The initrd {Name} does not fit in guest memory at 0x{address.Value + done:x}.");
            BootFile.ReadExactly(_file!, (long)done, span, "initrd");
            done += (ulong)chunk;
        }
    }

    public void Dispose() => _file?.Dispose();
}
