using System.Diagnostics;

namespace KvmSharp.Images.Tests;

/// <summary>A temporary directory per test, and helpers to run qemu-img / qemu-io.</summary>
public sealed class TempDir : IDisposable
{
    public string Path { get; } = Directory.CreateTempSubdirectory("kvmsharp-img-").FullName;
    public string this[string name] => System.IO.Path.Combine(Path, name);
    public void Dispose()
    {
        try { Directory.Delete(Path, true); } catch (IOException) { }
    }
}

public static class Qemu
{
    private static readonly Lazy<bool> s_have = new(() =>
    {
        try { return Run("qemu-img", "--version").Code == 0; }
        catch (System.ComponentModel.Win32Exception) { return false; }
    });

    public static void Require()
    {
        if (!s_have.Value) Assert.Skip("qemu-img is not installed (apt-get install qemu-utils)");
    }

    public static (int Code, string Out, string Err) Run(string exe, params string[] args)
    {
        var psi = new ProcessStartInfo(exe) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var so = p.StandardOutput.ReadToEndAsync();
        string se = p.StandardError.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, so.Result, se);
    }

    public static string Img(params string[] args)
    {
        var r = Run("qemu-img", args);
        Assert.True(r.Code == 0, $"qemu-img {string.Join(' ', args)} failed ({r.Code}): {r.Err}{r.Out}");
        return r.Out;
    }

    public static void Io(string image, string fmt, params string[] commands)
    {
        var args = new List<string> { "-f", fmt };
        foreach (var c in commands) { args.Add("-c"); args.Add(c); }
        args.Add(image);
        var r = Run("qemu-io", args.ToArray());
        Assert.True(r.Code == 0 && !r.Out.Contains("error", StringComparison.OrdinalIgnoreCase), $"qemu-io failed: {r.Err}{r.Out}");
    }

    public static (int Code, string Out) Check(string image)
    {
        var r = Run("qemu-img", "check", image);
        return (r.Code, r.Out + r.Err);
    }
}

public static class Pattern
{
    /// <summary>Deterministic data with zero runs, so images have holes, zero and data clusters.</summary>
    public static byte[] Make(int size, int seed)
    {
        var rnd = new Random(seed);
        var b = new byte[size];
        int pos = 0;
        while (pos < size)
        {
            int run = Math.Min(size - pos, rnd.Next(1, 200_000));
            if (rnd.Next(3) != 0) rnd.NextBytes(b.AsSpan(pos, run));
            else if (rnd.Next(2) == 0) b.AsSpan(pos, run).Fill((byte)rnd.Next(256)); // compressible
            pos += run;
        }
        return b;
    }

    public static byte[] ReadAll(IBlockDevice d)
    {
        var b = new byte[d.Size];
        d.Read(b, 0);
        return b;
    }

    public static void AssertEqual(byte[] expected, byte[] actual)
    {
        Assert.Equal(expected.Length, actual.Length);
        int i = expected.AsSpan().CommonPrefixLength(actual);
        Assert.True(i == expected.Length, $"first difference at byte {i} (0x{i:x})");
    }
}
