namespace KvmSharp.Images;

/// <summary>Stable classification of image errors; values never change meaning.</summary>
public enum ImageErrorKind
{
    /// <summary>The file is not an image of the expected format (bad magic, bad header).</summary>
    InvalidFormat = 1,
    /// <summary>A valid image uses a feature this library does not implement (named in the message).</summary>
    UnsupportedFeature = 2,
    /// <summary>Image metadata is inconsistent (offsets out of range, overlaps, bad compressed data).</summary>
    Corrupt = 3,
    /// <summary>A request addressed bytes outside the virtual disk.</summary>
    OutOfBounds = 4,
    /// <summary>The host failed an I/O operation.</summary>
    Io = 5,
    /// <summary>A write was attempted on an image opened read-only.</summary>
    ReadOnly = 6,
    /// <summary>Backing chain too deep or looping.</summary>
    BackingChain = 7,
    /// <summary>A value given to the library was invalid: a size, an option, a file that is not an image (the img front end reports its own usage errors with this kind too).</summary>
    InvalidArgument = 8,
    /// <summary>Another user of the image (QEMU's lock protocol, see <see cref="ImageLock"/>) conflicts.</summary>
    InUse = 9,
}

/// <summary>The one exception type of KvmSharp.Images: a <see cref="Kind"/>, the file, and where known the byte offset.</summary>
public sealed class ImageException : Exception
{
    public ImageErrorKind Kind { get; }
    public string? Path { get; }
    /// <summary>Byte offset in the file (or in the virtual disk for <see cref="ImageErrorKind.OutOfBounds"/>), or -1.</summary>
    public long Offset { get; }

    public ImageException(ImageErrorKind kind, string? path, string message, long offset = -1, Exception? inner = null)
        : base(message, inner)
    {
        Kind = kind;
        Path = path;
        Offset = offset;
    }

    public ImageException() : this(ImageErrorKind.Io, null, "image error") { }
    public ImageException(string message) : this(ImageErrorKind.Io, null, message) { }
    public ImageException(string message, Exception inner) : this(ImageErrorKind.Io, null, message, -1, inner) { }

    /// <summary>One line for the user: "file: message (offset 0x…)".</summary>
    public string ToUserString()
    {
        string where = Path is null ? "" : Path + ": ";
        string off = Offset >= 0 ? $" (offset 0x{Offset:x})" : "";
        return where + Message + off;
    }
}

/// <summary>Keeps throw sites out of hot methods so they stay small and inlinable.</summary>
internal static class ThrowHelper
{
    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    public static void Throw(ImageErrorKind kind, string? path, string message, long offset = -1)
        => throw new ImageException(kind, path, message, offset);

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    public static T Throw<T>(ImageErrorKind kind, string? path, string message, long offset = -1)
        => throw new ImageException(kind, path, message, offset);

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    public static void Io(string? path, string op, Exception inner, long offset = -1)
        => throw new ImageException(ImageErrorKind.Io, path, $"{op} failed: {inner.Message}", offset, inner);
}
