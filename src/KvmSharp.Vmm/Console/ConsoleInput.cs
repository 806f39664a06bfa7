using KvmSharp.Interop;

namespace KvmSharp.Vmm.Console;

/// <summary>
/// Feeds host stdin to the guest's UART from a background thread. On a TTY the terminal is put in
/// raw mode and <c>Ctrl-A x</c> quits (<c>Ctrl-A Ctrl-A</c> sends one Ctrl-A), as QEMU's mux does;
/// from a pipe every byte passes through unchanged. EOF simply stops the reader: the guest goes on.
/// </summary>
internal sealed class ConsoleInput : IDisposable
{
    private const byte CtrlA = 0x01;
    private readonly int _fd;
    private readonly Func<ReadOnlySpan<byte>, int> _deliver;
    private readonly Action _quit;
    private readonly Libc.Termios? _saved;
    private readonly Thread _thread;
    private volatile bool _stopping;

    public ConsoleInput(int fd, Func<ReadOnlySpan<byte>, int> deliver, Action quit)
    {
        _fd = fd;
        _deliver = deliver;
        _quit = quit;
        _saved = Libc.MakeRaw(fd);
        IsTerminal = _saved.HasValue;
        _thread = new Thread(ReadLoop) { IsBackground = true, Name = "console-in" };
    }

    public bool IsTerminal { get; }

    public void Start() => _thread.Start();

    private void ReadLoop()
    {
        Span<byte> buf = stackalloc byte[256];
        Span<byte> outBuf = stackalloc byte[256];
        bool escape = false;
        while (!_stopping)
        {
            int n = Libc.Read(_fd, buf);
            if (n <= 0)
                return; // EOF or error: stop reading, keep the VM running.
            int m = 0;
            for (int i = 0; i < n; i++)
            {
                byte b = buf[i];
                if (IsTerminal && escape)
                {
                    escape = false;
                    if (b is (byte)'x' or (byte)'X')
                    {
                        _quit();
                        return;
                    }
                    if (b != CtrlA)
                        continue;
                }
                else if (IsTerminal && b == CtrlA)
                {
                    escape = true;
                    continue;
                }
                outBuf[m++] = b;
            }
            Deliver(outBuf[..m]);
        }
    }

    private void Deliver(ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty && !_stopping)
        {
            int accepted = _deliver(data);
            data = data[accepted..];
            if (!data.IsEmpty)
                Thread.Sleep(1); // the UART's buffer is full: wait for the guest to drain it
        }
    }

    public void Dispose()
    {
        _stopping = true;
        if (_saved is { } saved)
            Libc.RestoreTerminal(_fd, saved);
    }
}
