using System.IO.Pipes;
using KvmSharp.Interop;
using KvmSharp.Vmm.Console;
using Xunit;

namespace KvmSharp.Vmm.Tests;

/// <summary>Console input as an event-loop source, over a real pipe: escapes, back-pressure, EOF.</summary>
public sealed class ConsoleInputTests : IDisposable
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);
    private readonly EventLoop _loop = new();
    private readonly AnonymousPipeServerStream _reader = new(PipeDirection.In);
    private readonly AnonymousPipeClientStream _writer;
    private readonly List<byte> _delivered = [];
    private readonly ManualResetEventSlim _quit = new();

    public ConsoleInputTests() => _writer = new AnonymousPipeClientStream(PipeDirection.Out, _reader.ClientSafePipeHandle);

    public void Dispose()
    {
        _loop.Dispose();
        _writer.Dispose();
        _reader.Dispose();
        _quit.Dispose();
    }

    private int ReadFd => (int)_reader.SafePipeHandle.DangerousGetHandle();

    private static byte[] Filter(string input, out bool quit)
    {
        bool escape = false;
        byte[] bytes = [.. input.Select(c => (byte)c)];
        var output = new byte[bytes.Length];
        int n = ConsoleInput.Filter(bytes, output, ref escape, out quit);
        return output[..n];
    }

    [Theory]
    [InlineData("abc", "abc", false)]
    [InlineData("a\u0001xbc", "a", true)]
    [InlineData("a\u0001Xbc", "a", true)]
    [InlineData("a\u0001\u0001b", "a\u0001b", false)]
    [InlineData("a\u0001qb", "ab", false)]
    public void Filter_HandlesTheCtrlAEscape(string input, string expected, bool quits)
    {
        byte[] output = Filter(input, out bool quit);
        Assert.Equal(expected.Select(c => (byte)c), output);
        Assert.Equal(quits, quit);
    }

    [Fact]
    public void Filter_CarriesAnEscapeAcrossReads()
    {
        bool escape = false;
        var output = new byte[4];
        Assert.Equal(0, ConsoleInput.Filter([0x01], output, ref escape, out bool quit));
        Assert.True(escape);
        Assert.False(quit);
        Assert.Equal(0, ConsoleInput.Filter("x"u8, output, ref escape, out quit));
        Assert.True(quit);
    }

    private ConsoleInput Start(Func<ReadOnlySpan<byte>, int> deliver, bool escapes)
    {
        var input = new ConsoleInput(ReadFd, _loop, deliver, () => _quit.Set(), escapes);
        input.Start();
        _loop.Start();
        return input;
    }

    private int Collect(ReadOnlySpan<byte> data)
    {
        lock (_delivered)
            _delivered.AddRange(data);
        return data.Length;
    }

    private void WaitFor(int count)
    {
        var deadline = DateTime.UtcNow + Wait;
        while (DateTime.UtcNow < deadline)
        {
            lock (_delivered)
            {
                if (_delivered.Count >= count)
                    return;
            }
            Thread.Sleep(5);
        }
        Assert.Fail($"only {_delivered.Count} of {count} bytes arrived");
    }

    [Fact]
    public void PipeBytes_ReachTheDevice_OnTheIoThread()
    {
        int ioThread = -1;
        using var input = Start(data => { ioThread = Environment.CurrentManagedThreadId; return Collect(data); }, escapes: false);
        _writer.Write("hello\u0001x"u8);
        _writer.Flush();
        WaitFor(7);
        Assert.Equal("hello\u0001x"u8.ToArray(), _delivered);
        Assert.False(_quit.IsSet); // from a pipe, Ctrl-A is an ordinary byte
        Assert.NotEqual(Environment.CurrentManagedThreadId, ioThread);
    }

    [Fact]
    public void CtrlAx_OnATerminal_Quits()
    {
        using var input = Start(Collect, escapes: true);
        _writer.Write("ls\u0001x"u8);
        _writer.Flush();
        Assert.True(_quit.Wait(Wait, TestContext.Current.CancellationToken));
        Assert.Equal("ls"u8.ToArray(), _delivered);
    }

    [Fact]
    public void FullDevice_HoldsTheBytes_AndRetriesUntilTheyAllFit()
    {
        // A UART whose buffer is full takes nothing, then one byte per call.
        int calls = 0;
        using var input = Start(data =>
        {
            if (Interlocked.Increment(ref calls) <= 3)
                return 0;
            return Collect(data[..1]);
        }, escapes: false);
        byte[] text = [.. Enumerable.Range(0, 600).Select(i => (byte)('a' + i % 26))];
        _writer.Write(text);
        _writer.Flush();
        WaitFor(text.Length);
        Assert.Equal(text, _delivered);
    }

    [Fact]
    public void Eof_StopsReading_AndTheLoopGoesOn()
    {
        using var input = Start(Collect, escapes: false);
        _writer.Write("bye"u8);
        _writer.Dispose(); // EOF (and EPOLLHUP) after the bytes
        WaitFor(3);
        Thread.Sleep(50);
        Assert.Equal("bye"u8.ToArray(), _delivered);
    }
}
