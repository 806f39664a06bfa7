using KvmSharp.Images;

namespace KvmSharp.Cli.Img;

/// <summary>
/// <c>kvmsharp img</c>: qemu-img's syntax, output and exit codes for create, info, check, convert, commit,
/// rebase, resize, map, compare, snapshot -l and bench. Errors are one line naming the file.
/// </summary>
internal static class ImgCommand
{
    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        ArgumentNullException.ThrowIfNull(args);
        ArgumentNullException.ThrowIfNull(stdout);
        ArgumentNullException.ThrowIfNull(stderr);
        if (args.Length == 0 || args[0] is "-h" or "--help" or "help")
        {
            stdout.Write(Usage);
            return args.Length == 0 ? 1 : 0;
        }
        string cmd = args[0];
        var rest = args[1..];
        try
        {
            return cmd switch
            {
                "create" => CreateCommand.Run(rest, stdout),
                "info" => InfoCommand.Run(rest, stdout),
                "check" => CheckCommand.Run(rest, stdout, stderr),
                "convert" => ConvertCommand.Run(rest, stdout),
                "commit" => CommitCommand.Run(rest, stdout),
                "rebase" => RebaseCommand.Run(rest, stdout),
                "resize" => ResizeCommand.Run(rest, stdout),
                "map" => MapCommand.Run(rest, stdout),
                "compare" => CompareCommand.Run(rest, stdout, stderr),
                "snapshot" => SnapshotCommand.Run(rest, stdout),
                "bench" => BenchCommand.Run(rest, stdout),
                _ => throw ImgArgs.Bad($"Command not found: {cmd}"),
            };
        }
        catch (ImageException e)
        {
            stderr.WriteLine("img: " + e.ToUserString());
            return cmd == "compare" ? 2 : 1;
        }
        catch (Exception e) when (e is OverflowException or FormatException)
        {
            stderr.WriteLine("img: invalid number: " + e.Message);
            return 1;
        }
        catch (Exception e) when (e is ArgumentException)
        {
            stderr.WriteLine("img: " + e.Message);
            return 1;
        }
    }

    private const string Usage = """
        usage: kvmsharp img COMMAND [options]
          create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
          info [-f fmt] [--output=human|json] [--backing-chain] [-U] filename
          check [-q] [-f fmt] [--output=human|json] [-r leaks|all] [-U] filename
          convert [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-o options] filename output_filename
          commit [-q] [-f fmt] [-d] [-p] filename
          compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
          map [-f fmt] [--output=human|json] [-U] filename
          snapshot -l [-U] filename
          rebase [-q] [-f fmt] [-p] [-u] -b backing_file [-F backing_fmt] filename
          resize [-q] [-f fmt] [--shrink] filename [+|-]size
          bench [-c count] [-d depth] [-f fmt] [--flush-interval=n] [-o offset] [--pattern=p] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename

        """;
}
