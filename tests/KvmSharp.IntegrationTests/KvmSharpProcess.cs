using System.Diagnostics;
using System.Text;

namespace KvmSharp.IntegrationTests;

/// <summary>Runs out/kvmsharp as a user would, with stdin, stdout and stderr piped, and collects output.</summary>
internal sealed class KvmSharpProcess : IDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _stdout = new();
    private readonly StringBuilder _stderr = new();
    private readonly Lock _lock = new();

    public KvmSharpProcess(IEnumerable<string> args, string? fileName = null)
    {
        var psi = new ProcessStartInfo(fileName ?? Assets.Binary)
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        _process = new Process { StartInfo = psi };
        _process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (_lock) _stdout.AppendLine(e.Data); };
        _process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (_lock) _stderr.AppendLine(e.Data); };
        _process.Start();
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
    }

    public string Stdout { get { lock (_lock) return _stdout.ToString(); } }
    public string Stderr { get { lock (_lock) return _stderr.ToString(); } }
    public int ExitCode => _process.ExitCode;
    public int Pid => _process.Id;

    public void WriteInput(string text)
    {
        _process.StandardInput.Write(text);
        _process.StandardInput.Flush();
    }

    /// <summary>Waits until stdout contains <paramref name="marker"/>; false on timeout or process exit.</summary>
    public bool WaitForOutput(string marker, TimeSpan timeout)
    {
        var sw = Stopwatch.StartNew();
        while (sw.Elapsed < timeout)
        {
            if (Stdout.Contains(marker, StringComparison.Ordinal))
                return true;
            if (_process.HasExited)
            {
                _process.WaitForExit();
                return Stdout.Contains(marker, StringComparison.Ordinal);
            }
            Thread.Sleep(100);
        }
        return false;
    }

    public bool WaitForExit(TimeSpan timeout)
    {
        if (!_process.WaitForExit(timeout))
            return false;
        _process.WaitForExit(); // drain the async readers
        return true;
    }

    public static (int Code, string Stdout, string Stderr) RunToEnd(TimeSpan timeout, params string[] args)
    {
        using var p = new KvmSharpProcess(args);
        p._process.StandardInput.Close();
        if (!p.WaitForExit(timeout))
            throw new TimeoutException($"kvmsharp {string.Join(' ', args)} did not exit within {timeout}.\nstdout:\n{p.Stdout}\nstderr:\n{p.Stderr}");
        return (p.ExitCode, p.Stdout, p.Stderr);
    }

    public void Dispose()
    {
        if (!_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
            _process.WaitForExit();
        }
        _process.Dispose();
    }
}
