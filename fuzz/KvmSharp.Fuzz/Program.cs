using SharpFuzz;

namespace KvmSharp.Fuzz;

/// <summary>
/// <c>KvmSharp.Fuzz TARGET</c> under afl-fuzz, from the instrumented copy (SharpFuzz's
/// out-of-process fork server: one child process runs many inputs and is restarted when it dies); <c>KvmSharp.Fuzz TARGET FILE...</c> from the plain build
/// runs files once each and prints "accepted" or the refusal, to reproduce a crash or check seeds.
/// Targets: qcow2, kernel, xz, payload. See fuzz/README.md.
/// </summary>
internal static class Program
{
    private static int Main(string[] args)
    {
        Func<byte[], string?>? target = args.Length == 0 ? null : args[0] switch
        {
            "qcow2" => Qcow2(),
            "kernel" => Kernel(),
            "xz" => data => XzTarget.RunXz(data),
            "payload" => data => XzTarget.RunPayload(data),
            _ => null,
        };
        if (target is null)
        {
            Console.Error.WriteLine("usage: KvmSharp.Fuzz qcow2|kernel|xz|payload [FILE...]");
            return 2;
        }
        if (args.Length > 1)
        {
            foreach (string file in args[1..])
            {
                Console.Out.Write($"{file}: ");
                Console.Out.Flush();
                Console.Out.WriteLine(target(File.ReadAllBytes(file)) is { } refusal ? "refused: " + refusal : "accepted");
            }
            return 0;
        }
        // Out of process: the fork server keeps running when an input kills the process outright
        // (stack overflow, a fatal runtime error), so afl records that input as a crash instead of
        // aborting with "Unable to communicate with fork server" (seen with the in-process server).
        var buffer = new MemoryStream();
        Fuzzer.OutOfProcess.Run(stream =>
        {
            buffer.SetLength(0);
            stream.CopyTo(buffer);
            target(buffer.ToArray());
        });
        return 0;
    }

    private static Func<byte[], string?> Qcow2()
    {
        // tmpfs when there is one: every input is written to a file and opened by path.
        string root = Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath();
        string dir = Path.Combine(root, $"kvmsharp-fuzz-{Environment.ProcessId}");
        Directory.CreateDirectory(dir);
        AppDomain.CurrentDomain.ProcessExit += (_, _) => Directory.Delete(dir, recursive: true);
        return data => Qcow2Target.Run(data, dir);
    }

    private static Func<byte[], string?> Kernel()
    {
        var memory = KernelTarget.CreateMemory();
        return data => KernelTarget.Run(data, memory);
    }
}
