namespace KvmSharp.Boot;

/// <summary>
/// Opens the kernel and initrd files. Each is a regular file whose length is known (fstat) and checked
/// against what the guest can hold before a byte is read; then exactly that many bytes are read, so a
/// file that grows meanwhile costs nothing more. A pipe or a device (<c>/dev/zero</c> reports length 0
/// and never ends) is refused: reading it "to the end" would take the host's memory.
/// </summary>
internal static class BootFile
{
    /// <summary>Opens <paramref name="path"/> for reading, unbuffered (reads go straight to the caller's span).</summary>
    /// <param name="path">The kernel or initrd file.</param>
    /// <param name="what">"kernel" or "initrd", for messages.</param>
    /// <exception cref="BootException">Missing, unreadable, a directory, a pipe or device, or empty.</exception>
    public static FileStream Open(string path, string what)
    {
        FileStream f;
        try
        {
            f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, bufferSize: 0);
        }
        catch (Exception ex) when (ex is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new BootException($"The {what} file {path} does not exist.", ex);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            throw new BootException($"The {what} file {path} cannot be read: {ex.Message}", ex);
        }
        // FileStream.Length is fstat's st_size: 0 for character devices, and a pipe cannot seek.
        if (!f.CanSeek || f.Length == 0)
        {
            f.Dispose();
            throw new BootException($"The {what} file {path} is empty or not a regular file (a pipe or a device cannot be read as the {what}).");
        }
        return f;
    }

    /// <summary>Reads exactly <paramref name="destination"/>.Length bytes from <paramref name="offset"/>.</summary>
    /// <exception cref="BootException">The file ended early (it shrank after it was opened) or a read failed.</exception>
    public static void ReadExactly(FileStream f, long offset, Span<byte> destination, string what)
    {
        try
        {
            while (!destination.IsEmpty)
            {
                int n = RandomAccess.Read(f.SafeFileHandle, destination, offset);
                if (n <= 0)
                    throw new BootException($"The {what} file {f.Name} ended at byte {offset}, before the length it had when it was opened.");
                destination = destination[n..];
                offset += n;
            }
        }
        catch (IOException ex)
        {
            throw new BootException($"The {what} file {f.Name} cannot be read: {ex.Message}", ex);
        }
    }
}
