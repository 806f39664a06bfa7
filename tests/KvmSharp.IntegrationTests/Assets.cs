using KvmSharp.Kvm;
using Xunit;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// Where the built binary and the test guests are. scripts/test.sh builds both and exports
/// KVMSHARP_BIN and KVMSHARP_GUEST_DIR; without them the repo's default paths are used.
/// </summary>
internal static class Assets
{
    public static string RepoRoot { get; } = FindRepoRoot();

    public static string Binary => Environment.GetEnvironmentVariable("KVMSHARP_BIN") ?? Path.Combine(RepoRoot, "out", "kvmsharp");
    public static string GuestDir => Environment.GetEnvironmentVariable("KVMSHARP_GUEST_DIR") ?? Path.Combine(RepoRoot, "guest", "out");
    public static string MinimalKernel => Path.Combine(GuestDir, "minimal", "bzImage");
    public static string MinimalVmlinux => Path.Combine(GuestDir, "minimal", "vmlinux");
    public static string Initrd => Path.Combine(GuestDir, "initrd.cpio");
    public static string DistroKernel => Path.Combine(GuestDir, "distro", "vmlinuz");
    public static string DistroInitrd => Path.Combine(GuestDir, "distro", "initrd.cpio");

    /// <summary>The command line the boot tests use: fast on a PVM host, harmless elsewhere (pvm-notes.md).</summary>
    public const string FastCmdline =
        "console=ttyS0 reboot=k panic=1 nokaslr i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp no_timer_check " +
        "tsc=reliable random.trust_cpu=on mitigations=off nowatchdog cryptomgr.notests " +
        "sysctl.kernel.hung_task_timeout_secs=0 rcupdate.rcu_cpu_stall_suppress=1";

    public static void RequireBinary()
    {
        if (!File.Exists(Binary))
            Assert.Fail($"{Binary} is missing: run scripts/build.sh (scripts/test.sh does)");
    }

    /// <summary>
    /// A KVM test never skips: without /dev/kvm it fails, because scripts/test.sh runs this tier
    /// through scripts/kvm-host.sh (directly, or in the nested KVM host).
    /// </summary>
    public static void RequireKvm()
    {
        if (!KvmSystem.IsAvailable(out string reason))
            Assert.Fail($"KVM is not usable here: {reason}. Run the KVM tiers through scripts/kvm-host.sh (scripts/test.sh does).");
    }

    public static void RequireFile(string path, string how)
    {
        if (!File.Exists(path))
            Assert.Fail($"{path} is missing: {how}");
    }

    private static string FindRepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "KvmSharp.slnx")))
            dir = dir.Parent;
        return dir?.FullName ?? Directory.GetCurrentDirectory();
    }
}
