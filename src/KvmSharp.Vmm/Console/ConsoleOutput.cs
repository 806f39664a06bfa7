using KvmSharp.Interop;

namespace KvmSharp.Vmm.Console;

/// <summary>
/// The serial console's sink: bytes go straight to a host fd (stdout by default), unbuffered so the
/// guest's output appears as it is produced, and through the panic detector.
/// </summary>
internal sealed class ConsoleOutput : Stream
{
    private readonly int _fd;
    private readonly PanicDetector _panic;

    public ConsoleOutput(int fd, PanicDetector panic)
    {
        _fd = fd;
        _panic = panic;
    }

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        foreach (byte b in buffer)
            _panic.Feed(b);
        // A closed or full terminal must not stop the guest: output is best effort.
        _ = Libc.WriteAll(_fd, buffer);
    }

    public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

    public override void WriteByte(byte value)
    {
        Span<byte> one = [value];
        Write(one);
    }

    public override void Flush() { }
    public override bool CanRead => false;
    public override bool CanSeek => false;
    public override bool CanWrite => true;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
    public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
}
