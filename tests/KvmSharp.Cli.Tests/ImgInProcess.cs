using KvmSharp.Cli.Img;

namespace KvmSharp.Cli.Tests;

/// <summary>Runs `kvmsharp img ARGS` in this process, capturing its exit code, stdout and stderr.</summary>
internal static class ImgInProcess
{
    public static (int Code, string Out, string Err) Run(string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        int rc = ImgCommand.Run(args, o, e);
        return (rc, o.ToString(), e.ToString());
    }
}
