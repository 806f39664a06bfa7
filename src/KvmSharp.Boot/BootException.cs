namespace KvmSharp.Boot;

/// <summary>
/// The kernel, initrd, command line or memory size cannot be used to boot. The message is one
/// sentence naming the file or value at fault; callers show it to the user as is.
/// </summary>
public sealed class BootException : Exception
{
    public BootException() { }
    public BootException(string message) : base(message) { }
    public BootException(string message, Exception inner) : base(message, inner) { }
}
