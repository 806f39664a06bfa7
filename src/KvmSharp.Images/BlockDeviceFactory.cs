using KvmSharp.Images.Qcow2;

namespace KvmSharp.Images;

/// <summary>Opens raw and qcow2 images, probing the format and opening backing chains.</summary>
public static class BlockDeviceFactory
{
    /// <summary>
    /// Opens <paramref name="path"/>. <paramref name="format"/> is "raw", "qcow2" or null to probe
    /// (qcow2 magic, else raw). Backing files are opened read-only; a relative backing name is resolved
    /// against the directory of the image that names it, as qemu-img does. Every file of the chain
    /// holds QEMU's locks (<see cref="ImageLock"/>) until the device is disposed: the image as a writer
    /// or reader, its backing files as readers.
    /// </summary>
    /// <exception cref="ImageException">InvalidFormat, UnsupportedFeature, Corrupt, BackingChain, InUse,
    /// InvalidArgument (not a regular file or block device) or Io.</exception>
    public static IBlockDevice Open(string path, bool readOnly, string? format = null)
        => Open(path, readOnly, format, openBacking: true);

    /// <param name="forceShare">qemu-img -U: read-only files let other processes write (no write or
    /// resize lock bytes); a writable image still takes a writer's locks.</param>
    /// <param name="chain">Files (device and inode) the chain must not contain, e.g. a command's other
    /// images; on return it holds every file of the opened chain too.</param>
    public static IBlockDevice Open(string path, bool readOnly, string? format, bool openBacking, bool forceShare = false, ISet<FileId>? chain = null)
    {
        try
        {
            return OpenChain(path, readOnly, format, 0, chain ?? new HashSet<FileId>(), openBacking, forceShare);
        }
        catch (ArgumentException e)
        {
            // Path APIs reject names with NUL and the like; a hostile backing name must not escape as this.
            throw new ImageException(ImageErrorKind.InvalidFormat, path, $"invalid file name in backing chain: {e.Message}", -1, e);
        }
    }

    /// <summary>"qcow2" when the file starts with the qcow2 magic, otherwise "raw".</summary>
    /// <exception cref="ImageException">InvalidArgument when it is not a regular file or block device; Io.</exception>
    public static string Probe(string path)
    {
        using var h = ImageFile.Open(path, writable: false, out _);
        return Probe(h, path);
    }

    private static string Probe(Microsoft.Win32.SafeHandles.SafeFileHandle h, string path)
    {
        try
        {
            Span<byte> b = stackalloc byte[4];
            int n = RandomAccess.Read(h, b, 0);
            return n == 4 && System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(b) == Qcow2Const.Magic ? "qcow2" : "raw";
        }
        catch (IOException e)
        {
            throw new ImageException(ImageErrorKind.Io, path, $"cannot read: {e.Message}", -1, e);
        }
    }

    /// <summary>qemu's path_combine: relative names are relative to the overlay's directory.</summary>
    public static string ResolveBackingPath(string overlayPath, string backingName)
    {
        if (System.IO.Path.IsPathRooted(backingName)) return backingName;
        string? dir = System.IO.Path.GetDirectoryName(overlayPath);
        return string.IsNullOrEmpty(dir) ? backingName : System.IO.Path.Combine(dir, backingName);
    }

    private static IBlockDevice OpenChain(string path, bool readOnly, string? format, int depth, ISet<FileId> seen, bool openBacking, bool forceShare)
    {
        if (depth > Qcow2Const.MaxBackingDepth)
            ThrowHelper.Throw(ImageErrorKind.BackingChain, path, $"backing chain deeper than {Qcow2Const.MaxBackingDepth}");
        var h = ImageFile.Open(path, !readOnly, out FileId id);
        Qcow2Image img;
        try
        {
            // By device and inode, not by name: a hard link, symbolic link or "./x" is the same image.
            if (!seen.Add(id))
                ThrowHelper.Throw(ImageErrorKind.BackingChain, path, depth > 0 ? "backing chain loops back to this file" : "this file is already used by the command as another image");
            ImageFile.Lock(h, path, !readOnly, forceShare);
            string fmt = format ?? Probe(h, path);
            switch (fmt)
            {
                case "raw":
                    return new RawImage(h, path, readOnly);
                case "qcow2":
                    break;
                default:
                    return ThrowHelper.Throw<IBlockDevice>(ImageErrorKind.UnsupportedFeature, path, $"unknown image format '{fmt}'");
            }
            img = OpenQcow2(h, path, readOnly);
        }
        catch
        {
            h.Dispose();
            throw;
        }
        try
        {
            if (openBacking && img.Header.BackingFile is { } name)
            {
                if (name.Contains(':', StringComparison.Ordinal) && (name.StartsWith("json:", StringComparison.Ordinal) || name.Contains("://", StringComparison.Ordinal)))
                    ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, $"backing file protocol not supported: {name}");
                string bpath = ResolveBackingPath(path, name);
                img.Backing = OpenChain(bpath, true, img.Header.BackingFormat, depth + 1, seen, true, forceShare);
            }
            if (!readOnly)
            {
                if ((img.Header.Incompatible & Qcow2Const.IncompatDirty) != 0)
                {
                    // Lazy refcounts left refcounts stale (qcow2.txt "dirty bit"): rebuild before writing.
                    Qcow2Check.Run(img, Qcow2Check.RepairMode.All);
                    img.SetHeaderDirtyBits(img.Header.Incompatible & ~Qcow2Const.IncompatDirty);
                }
                img.FinishOpen();
            }
            return img;
        }
        catch
        {
            img.Dispose();
            throw;
        }
    }

    /// <summary>Opens one qcow2 file (no backing chain) with QEMU's locks for a reader or writer.</summary>
    internal static Qcow2Image OpenQcow2(string path, bool readOnly, bool allowCorrupt = false, bool forceShare = false)
        => OpenQcow2(ImageFile.OpenLocked(path, !readOnly, forceShare, out _), path, readOnly, allowCorrupt);

    /// <summary>Reads the header from <paramref name="h"/>; the image owns the handle, which is
    /// disposed here if the image cannot be built.</summary>
    private static Qcow2Image OpenQcow2(Microsoft.Win32.SafeHandles.SafeFileHandle h, string path, bool readOnly, bool allowCorrupt = false)
    {
        try
        {
            long len = ImageFile.Length(h, path);
            byte[] buf = new byte[(int)Math.Min(len, 1 << Qcow2Const.MaxClusterBits)];
            int n = RandomAccess.Read(h, buf, 0);
            var hdr = Qcow2Header.Parse(buf.AsSpan(0, n), len, path);
            return new Qcow2Image(h, path, hdr, readOnly, allowCorrupt);
        }
        catch
        {
            h.Dispose();
            throw;
        }
    }
}
