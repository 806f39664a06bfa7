using Iced.Intel;

namespace KvmSharp.Vmm.Pvm;

/// <summary>An Iced code reader over a fixed 15-byte buffer that can be refilled, so decoding allocates nothing.</summary>
internal sealed class ReusableCodeReader : CodeReader
{
    private readonly byte[] _buffer = new byte[15];
    private int _length;
    private int _position;

    public Span<byte> Buffer => _buffer;

    public void Reset(int length)
    {
        _length = length;
        _position = 0;
    }

    public override int ReadByte() => _position < _length ? _buffer[_position++] : -1;
}
