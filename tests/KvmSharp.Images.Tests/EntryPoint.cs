namespace KvmSharp.Images.Tests;

/// <summary>
/// xunit v3's generated entry point, plus "--crash-writer IMAGE SEED": a child process that writes to an
/// image until it is killed with SIGKILL (CrashSafetyTests).
/// </summary>
internal static class EntryPoint
{
    public static int Main(string[] args)
    {
        if (args.Length == 3 && args[0] == "--crash-writer")
            return CrashWriter.Run(args[1], int.Parse(args[2], System.Globalization.CultureInfo.InvariantCulture));
        if (args.Any(a => a == "--server" || a == "--internal-msbuild-node"))
            return Xunit.MicrosoftTestingPlatform.TestPlatformTestFramework.RunAsync(args, SelfRegisteredExtensions.AddSelfRegisteredExtensions).GetAwaiter().GetResult();
        return Xunit.Runner.InProc.SystemConsole.ConsoleRunner.Run(args).GetAwaiter().GetResult();
    }
}

internal static class CrashWriter
{
    public static int Run(string image, int seed)
    {
        var rnd = new Random(seed);
        var buf = new byte[64 * 1024];
        rnd.NextBytes(buf);
        using var dev = BlockDeviceFactory.Open(image, readOnly: false);
        ulong size = dev.Size;
        for (long i = 0; ; i++)
        {
            int len = rnd.Next(1, buf.Length);
            ulong off = (ulong)rnd.NextInt64(0, (long)(size - (ulong)len));
            if (rnd.Next(10) == 0) dev.WriteZeroes(off, (ulong)len);
            else dev.Write(buf.AsSpan(0, len), off);
            if (rnd.Next(40) == 0) dev.Flush();
            if (i == 20)
            {
                dev.Flush();
                Console.Out.WriteLine("ready");
                Console.Out.Flush();
            }
        }
    }
}
