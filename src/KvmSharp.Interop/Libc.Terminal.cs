using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace KvmSharp.Interop;

public static unsafe partial class Libc
{
    /// <summary>glibc's struct termios (60 bytes on x86-64), kept opaque: we only save, make raw and restore it.</summary>
    [InlineArray(64)]
    public struct Termios { private byte _e0; }

    private const int TCSANOW = 0;

    [LibraryImport(LibraryName, EntryPoint = "tcgetattr", SetLastError = true)]
    private static partial int tcgetattr(int fd, Termios* t);

    [LibraryImport(LibraryName, EntryPoint = "tcsetattr", SetLastError = true)]
    private static partial int tcsetattr(int fd, int action, Termios* t);

    [LibraryImport(LibraryName, EntryPoint = "cfmakeraw")]
    private static partial void cfmakeraw(Termios* t);

    /// <summary>Puts a TTY in raw mode; returns the previous settings for <see cref="RestoreTerminal"/>, or null when fd is not a TTY.</summary>
    public static Termios? MakeRaw(int fd)
    {
        Termios saved;
        // SAFETY: &saved and &raw are locals at least as large as glibc's struct termios (Termios: 64 ≥ 60 bytes),
        // which tcgetattr fills and cfmakeraw/tcsetattr read during the call only.
        if (isatty(fd) != 1 || tcgetattr(fd, &saved) != 0)
            return null;
        Termios raw = saved;
        cfmakeraw(&raw);
        return tcsetattr(fd, TCSANOW, &raw) == 0 ? saved : null;
    }

    // SAFETY: &saved is a by-value copy of a struct termios that tcgetattr filled (MakeRaw).
    public static void RestoreTerminal(int fd, Termios saved) => tcsetattr(fd, TCSANOW, &saved);
}
