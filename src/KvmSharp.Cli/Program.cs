using System.Reflection;

namespace KvmSharp.Cli;

/// <summary>The <c>kvmsharp</c> entry point: <c>run</c>, <c>img</c>, <c>--version</c>, <c>--help</c>.</summary>
internal static class Program
{
    private const int UsageError = 2;

    private static int Main(string[] args)
    {
        // `kvmsharp help COMMAND` is `kvmsharp COMMAND --help`, as with git and cargo.
        if (args is ["help", var command, ..])
            args = [command, "--help"];
        if (args.Length == 0 || args[0] is "-h" or "--help" or "help")
        {
            System.Console.Out.Write(Usage);
            return args.Length == 0 ? UsageError : 0;
        }
        if (args[0] is "-V" or "--version" or "version")
        {
            System.Console.Out.WriteLine($"kvmsharp {Version}");
            return 0;
        }
        return args[0] switch
        {
            "run" => RunCommand.Run(args[1..]),
            "img" => Img.ImgCommand.Run(args[1..], System.Console.Out, System.Console.Error),
            _ => Fail($"unknown command '{args[0]}' (try 'kvmsharp --help')", UsageError),
        };
    }

    internal static string Version =>
        typeof(Program).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion.Split('+')[0] ?? "0.0.0";

    internal static int Fail(string message, int code)
    {
        System.Console.Error.WriteLine($"kvmsharp: {message}");
        return code;
    }

    /// <summary><c>kvmsharp --help</c>: every command, and <c>run</c>'s options (the command most people want).</summary>
    internal const string Usage = """
        kvmsharp — a KVM virtual machine monitor for Linux guests

        Usage:
          kvmsharp run --kernel FILE [options]   boot a Linux kernel, serial console on this terminal
          kvmsharp run --config FILE             the same from a JSON file (Firecracker's config shape)
          kvmsharp img COMMAND [args]            create, inspect, check and convert disk images (qemu-img syntax)
          kvmsharp --version | --help
          kvmsharp COMMAND --help                one command's usage (also: kvmsharp help COMMAND)


        """ + RunOptions;

    /// <summary><c>kvmsharp run --help</c>.</summary>
    internal const string RunUsage = """
        Usage:
          kvmsharp run --kernel FILE [options]   boot a Linux kernel, serial console on this terminal
          kvmsharp run --config FILE             the same from a JSON file (Firecracker's config shape)


        """ + RunOptions;

    private const string RunOptions = """
        run options:
          --kernel FILE          bzImage or ELF vmlinux (required)
          --initrd FILE          initial ramdisk
          --cmdline "TEXT"       kernel command line (default: "console=ttyS0")
          --cpus N               vCPUs, 1-64 (default 1)
          --memory SIZE          guest RAM, e.g. 512M, 5G (default 256M)
          --cpu-template LIST    hide CPU features: none (default), minimal, pvm, feature names
                                 (avx2, popcnt …), LEAF[.SUB]:REG:BIT; comma-separated
          --kernel-decompress    let a bzImage decompress itself instead of the VMM doing it
          --pvh                  enter through the PVH entry point when the kernel has one
          --pvm auto|on|off      PVM-host compatibility (default auto: on when /dev/kvm is kvm_pvm)
          --debug-exit           isa-debug-exit at port 0xf4: a write of v exits with (v<<1)|1
          --disk PATH[,ro][,id=S][,format=raw|qcow2]   virtio-blk disk (raw or qcow2 overlay)
          --rng                  virtio-rng device (entropy from the host)
          --balloon MiB          virtio-balloon, initially taking MiB from the guest
          --console virtio|serial  stdin to virtio-console (hvc0) or the UART (default serial)
          --net tap=NAME[,mac=M] virtio-net on TAP NAME (created if missing; tap= lets the kernel name it)
          --transport pci|mmio   virtio devices on virtio-pci (default) or virtio-mmio
          --no-acpi              no ACPI tables and no PCI (MP table only)
          --ksm                  mark guest RAM mergeable (KSM page sharing)
          --hugepages            back guest RAM with hugetlbfs pages
          --prefault             populate all guest RAM before the guest starts

        run --config FILE: sections boot-source, drives, network-interfaces, machine-config, balloon,
          entropy (as Firecracker's --config-file) and kvmsharp {console, transport, acpi, cpu_template,
          debug_exit, pvh, pvm, kernel_decompress, ksm, prefault}. Relative paths are relative to the file.
          No other option may be given with --config.

        Console: raw mode on a terminal; Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A.

        Exit codes: 0 guest rebooted, powered off or halted; 1 VMM error (bad kernel, KVM refused);
          2 usage error; 3 guest kernel panic; 4 triple fault; 5 KVM internal error or failed entry;
          130 Ctrl-A x; 128+N killed by signal N; (v<<1)|1 debug-exit.

        """;
}
