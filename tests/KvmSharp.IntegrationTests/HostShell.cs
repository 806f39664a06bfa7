using System.Diagnostics;

namespace KvmSharp.IntegrationTests;

/// <summary>Host commands the boot tests need (mkfs.ext4, debugfs, ip netns, qemu-img).</summary>
internal static class HostShell
{
    /// <summary>Runs <paramref name="command"/> with sh; throws with its stderr when it fails and <paramref name="check"/> is set.</summary>
    public static void Run(string command, bool check = true)
    {
        using var p = Process.Start(new ProcessStartInfo("sh", ["-c", command]) { RedirectStandardError = true })!;
        string err = p.StandardError.ReadToEnd();
        p.WaitForExit();
        if (check && p.ExitCode != 0)
            throw new InvalidOperationException($"'{command}' failed: {err}");
    }

    /// <summary>Runs <paramref name="command"/> with sh and returns its stdout.</summary>
    public static string Output(string command)
    {
        using var p = Process.Start(new ProcessStartInfo("sh", ["-c", command]) { RedirectStandardOutput = true })!;
        string o = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return o;
    }

    /// <summary>Runs <paramref name="command"/> with sh and returns its exit code.</summary>
    public static int ExitCode(string command)
    {
        using var p = Process.Start(new ProcessStartInfo("sh", ["-c", command + " >/dev/null 2>&1"]))!;
        p.WaitForExit();
        return p.ExitCode;
    }

    /// <summary>A network namespace with a vnet_hdr TAP at <paramref name="hostIp"/>/24; deleted on dispose.</summary>
    public sealed class NetNamespace : IDisposable
    {
        public NetNamespace(string name, string tap, string hostIp)
        {
            Name = name;
            Run($"ip netns add {name}");
            try
            {
                Run($"ip netns exec {name} ip tuntap add dev {tap} mode tap vnet_hdr");
                Run($"ip netns exec {name} ip addr add {hostIp}/24 dev {tap}");
                Run($"ip netns exec {name} ip link set {tap} up");
                Run($"ip netns exec {name} ip link set lo up");
            }
            catch
            {
                Dispose();
                throw;
            }
        }

        public string Name { get; }

        public void Dispose() => Run($"ip netns del {Name}", check: false);
    }
}
