using KvmSharp.Images.Qcow2;

namespace KvmSharp.Images;

/// <summary>Opens raw and qcow2 images, probing the format and opening backing chains.</summary>
public static class BlockDeviceFactory
{
    /// <summary>
    /// Opens <paramref name="path"/>. <paramref name="format"/> is "raw", "qcow2" or null to probe
    /// (qcow2 magic, else raw). Backing files are opened read-only; a relative backing name is resolved
    /// against the directory of the image that names it, as qemu-img does.
    /// </summary>
    /// <exception cref="ImageException">InvalidFormat, UnsupportedFeature, Corrupt, BackingChain or Io.</exception>
    public static IBlockDevice Open(string path, bool readOnly, string? format = null)
        => Open(path, readOnly, format, openBacking: true);

    public static IBlockDevice Open(string path, bool readOnly, string? format, bool openBacking)
    {
        try
        {
            return OpenChain(path, readOnly, format, 0, new HashSet<string>(StringComparer.Ordinal), openBacking);
        }
        catch (ArgumentException e)
        {
            // Path APIs reject names with NUL and the like; a hostile backing name must not escape as this.
            throw new ImageException(ImageErrorKind.InvalidFormat, path, $"invalid file name in backing chain: {e.Message}", -1, e);
        }
    }

    /// <summary>"qcow2" when the file starts with the qcow2 magic, otherwise "raw".</summary>
    public static string Probe(string path)
    {
        try
        {
            using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            Span<byte> b = stackalloc byte[4];
            int n = RandomAccess.Read(h, b, 0);
            return n == 4 && System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(b) == Qcow2Const.Magic ? "qcow2" : "raw";
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ImageException(ImageErrorKind.Io, path, $"cannot open: {e.Message}", -1, e);
        }
    }

    /// <summary>qemu's path_combine: relative names are relative to the overlay's directory.</summary>
    public static string ResolveBackingPath(string overlayPath, string backingName)
    {
        if (System.IO.Path.IsPathRooted(backingName)) return backingName;
        string? dir = System.IO.Path.GetDirectoryName(overlayPath);
        return string.IsNullOrEmpty(dir) ? backingName : System.IO.Path.Combine(dir, backingName);
    }

    private static IBlockDevice OpenChain(string path, bool readOnly, string? format, int depth, HashSet<string> seen, bool openBacking)
    {
        if (depth > Qcow2Const.MaxBackingDepth)
            ThrowHelper.Throw(ImageErrorKind.BackingChain, path, $"backing chain deeper than {Qcow2Const.MaxBackingDepth}");
        string full = System.IO.Path.GetFullPath(path);
        if (!seen.Add(full))
            ThrowHelper.Throw(ImageErrorKind.BackingChain, path, "backing chain loops back to this file");
        string fmt = format ?? Probe(path);
        switch (fmt)
        {
            case "raw":
                return RawImage.Open(path, readOnly);
            case "qcow2":
                break;
            default:
                return ThrowHelper.Throw<IBlockDevice>(ImageErrorKind.UnsupportedFeature, path, $"unknown image format '{fmt}'");
        }
        var img = OpenQcow2(path, readOnly);
        try
        {
            if (openBacking && img.Header.BackingFile is { } name)
            {
                if (name.Contains(':', StringComparison.Ordinal) && (name.StartsWith("json:", StringComparison.Ordinal) || name.Contains("://", StringComparison.Ordinal)))
                    ThrowHelper.Throw(ImageErrorKind.UnsupportedFeature, path, $"backing file protocol not supported: {name}");
                string bpath = ResolveBackingPath(path, name);
                img.Backing = OpenChain(bpath, true, img.Header.BackingFormat, depth + 1, seen, true);
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

    internal static Qcow2Image OpenQcow2(string path, bool readOnly, bool allowCorrupt = false)
    {
        Microsoft.Win32.SafeHandles.SafeFileHandle h;
        try
        {
            h = File.OpenHandle(path, FileMode.Open, readOnly ? FileAccess.Read : FileAccess.ReadWrite,
                readOnly ? FileShare.ReadWrite : FileShare.Read);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ImageException(ImageErrorKind.Io, path, $"cannot open: {e.Message}", -1, e);
        }
        try
        {
            long len = RandomAccess.GetLength(h);
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
