using System.Globalization;
using KvmSharp.Vmm;

namespace KvmSharp.Cli;

/// <summary><c>kvmsharp run</c>: parse options, build the VM, run it, map the outcome to an exit code.</summary>
internal static class RunCommand
{
    public static int Run(string[] args)
    {
        // Anywhere on the line, as most tools do: `kvmsharp run --kernel x --help` shows the usage.
        if (Array.Exists(args, a => a is "-h" or "--help"))
        {
            System.Console.Out.Write(Program.RunUsage);
            return 0;
        }
        VmConfig config;
        try
        {
            // Both check the values against each other (VmConfig.CheckValues) before any file is read:
            // a usage error, in the flags' or the file's terms.
            config = args.Contains("--config") ? LoadConfigFile(args) : Parse(args);
        }
        catch (ArgumentException e)
        {
            return Program.Fail(e.Message, 2);
        }
        catch (VmConfigException e)
        {
            return Program.Fail(e.Message, 1);
        }

        Vm vm;
        try
        {
            vm = Vm.Create(config);
        }
        catch (Exception e)
        {
            // Vm.Create disposed what it had created. Whatever went wrong is one line and exit 1 (a stack
            // trace helps nobody who gave a bad disk image); KVMSHARP_VERBOSE=1 shows the whole exception.
            if (Environment.GetEnvironmentVariable("KVMSHARP_VERBOSE") == "1")
                System.Console.Error.WriteLine(e);
            return Program.Fail(OneLine(e.Message), 1);
        }

        using (vm)
        {
            var exit = vm.Run();
            if (exit.Code != 0 || Environment.GetEnvironmentVariable("KVMSHARP_VERBOSE") == "1")
            {
                var (exits, emulated, syscalls, pfs) = vm.Stats();
                System.Console.Error.WriteLine($"\r\nkvmsharp: {exit.Detail} (exit code {exit.Code}; {exits} exits" +
                    (vm.IsPvm ? $", PVM: {emulated} instructions emulated, {syscalls} syscalls completed, {pfs} #PF hook hits)" : ")"));
            }
            return exit.Code;
        }
    }

    private static string OneLine(string message) => message.ReplaceLineEndings(" ").Trim();

    /// <summary><c>run --config FILE</c>. The file is the whole description: mixing it with other
    /// options is refused rather than merged, so what runs is exactly what the file says.</summary>
    private static VmConfig LoadConfigFile(string[] args)
    {
        if (args is not ["--config", var file])
        {
            if (args[^1] == "--config")
                throw new ArgumentException("option --config needs a value");
            throw new ArgumentException("--config FILE cannot be combined with other run options: put everything in the file");
        }
        return ConfigFile.Load(file);
    }

    internal static VmConfig Parse(string[] args)
    {
        string? kernel = null, initrd = null, cmdline = null, template = null;
        int cpus = 1;
        ulong memory = 256UL << 20;
        bool kernelDecompress = false, pvh = false, debugExit = false, ksm = false, huge = false, prefault = false, acpi = true, rng = false;
        bool? pvm = null;
        var nets = new List<NetConfig>();
        var disks = new List<DiskConfig>();
        ulong? balloon = null;
        bool virtioConsole = false, virtioMmio = false;
        for (int i = 0; i < args.Length; i++)
        {
            string a = args[i];
            string Value()
            {
                if (i + 1 >= args.Length)
                    throw new ArgumentException($"option {a} needs a value");
                return args[++i];
            }
            switch (a)
            {
                case "--kernel": kernel = Value(); break;
                case "--initrd": initrd = Value(); break;
                case "--cmdline": cmdline = Value(); break;
                case "--cpus":
                    string c = Value();
                    if (!int.TryParse(c, NumberStyles.None, CultureInfo.InvariantCulture, out cpus) || cpus < 1 || cpus > VmConfig.MaxVcpus)
                        throw new ArgumentException($"--cpus must be a number from 1 to {VmConfig.MaxVcpus}, not '{c}'");
                    break;
                case "--memory": memory = ParseSize(Value(), "--memory"); break;
                case "--cpu-template": template = Value(); break;
                case "--kernel-decompress": kernelDecompress = true; break;
                case "--pvh": pvh = true; break;
                case "--pvm":
                    pvm = Value() switch
                    {
                        "auto" => null,
                        "on" => true,
                        "off" => false,
                        var v => throw new ArgumentException($"--pvm takes auto, on or off, not '{v}'"),
                    };
                    break;
                case "--debug-exit": debugExit = true; break;
                case "--ksm": ksm = true; break;
                case "--no-acpi": acpi = false; break;
                case "--rng": rng = true; break;
                case "--net": nets.Add(ParseNet(Value(), nets.Count)); break;
                case "--disk": disks.Add(ParseDisk(Value(), disks.Count)); break;
                case "--balloon":
                    string bv = Value();
                    balloon = ulong.TryParse(bv, NumberStyles.None, CultureInfo.InvariantCulture, out ulong mib) ? mib : throw new ArgumentException($"--balloon takes MiB as a number, not '{bv}'");
                    break;
                case "--console":
                    virtioConsole = Value() switch
                    {
                        "virtio" => true,
                        "serial" => false,
                        var cv => throw new ArgumentException($"--console takes virtio or serial, not '{cv}'"),
                    };
                    break;
                case "--transport":
                    virtioMmio = ParseTransport(Value(), "--transport");
                    break;
                case "--hugepages": huge = true; break;
                case "--prefault": prefault = true; break;
                default: throw new ArgumentException($"unknown option '{a}' for run (try 'kvmsharp --help')");
            }
        }
        if (kernel is null)
            throw new ArgumentException("run needs --kernel FILE");
        var config = new VmConfig
        {
            KernelPath = kernel,
            InitrdPath = initrd,
            CommandLine = cmdline ?? "console=ttyS0",
            CpuCount = cpus,
            MemoryBytes = memory,
            CpuTemplate = template ?? "none",
            DecompressInVmm = !kernelDecompress,
            PreferPvh = pvh,
            PvmCompat = pvm,
            DebugExit = debugExit,
            Acpi = acpi,
            Rng = rng,
            Nets = nets,
            Disks = disks,
            BalloonMiB = balloon,
            VirtioConsole = virtioConsole,
            VirtioMmio = virtioMmio,
            Mergeable = ksm,
            HugePages = huge,
            Prefault = prefault,
        };
        if (config.CheckValues() is { } problem)
            throw new ArgumentException(InFlags(problem));
        return config;
    }

    /// <summary>A <see cref="VmConfig"/> problem in this command line's terms: the flag that sets it.</summary>
    internal static string InFlags(VmConfigProblem p) => p.Setting switch
    {
        nameof(VmConfig.CpuCount) => $"--cpus: {p.Problem}",
        nameof(VmConfig.MemoryBytes) => $"--memory: {p.Problem}",
        nameof(VmConfig.BalloonMiB) => $"--balloon: {p.Problem}",
        nameof(VmConfig.CpuTemplate) => $"--cpu-template: {p.Problem}",
        nameof(VmConfig.Acpi) => "--no-acpi leaves no PCI bus for the virtio devices: drop it, or add --transport mmio",
        _ => p.ToString(),
    };

    /// <summary><c>pci</c> or <c>mmio</c>: true when the virtio devices go on virtio-mmio.</summary>
    internal static bool ParseTransport(string value, string what) => value switch
    {
        "pci" => false,
        "mmio" => true,
        _ => throw new ArgumentException($"{what} takes pci or mmio, not '{value}'"),
    };

    /// <summary>Parses <c>PATH[,ro][,id=SERIAL][,format=raw|qcow2]</c>.</summary>
    internal static DiskConfig ParseDisk(string text, int index)
    {
        var parts = text.Split(',');
        if (parts[0].Length == 0)
            throw new ArgumentException("--disk needs a path: --disk PATH[,ro][,id=SERIAL][,format=raw|qcow2]");
        bool ro = false;
        string serial = $"kvmsharp-disk{index}";
        string? format = null;
        foreach (var part in parts.Skip(1))
        {
            var kv = part.Split('=', 2);
            switch (kv[0])
            {
                case "ro" when kv.Length == 1: ro = true; break;
                case "id" when kv.Length == 2 && kv[1].Length is > 0 and <= 20: serial = kv[1]; break;
                case "format" when kv.Length == 2 && kv[1] is "raw" or "qcow2": format = kv[1]; break;
                default: throw new ArgumentException($"--disk: unknown or invalid setting '{part}' (ro, id=SERIAL of 1-20 characters, format=raw|qcow2)");
            }
        }
        return new DiskConfig(parts[0], ro, serial, format);
    }

    /// <summary>Parses <c>tap=NAME[,mac=52:54:00:12:34:56]</c> (tap= may be empty: the kernel names it).</summary>
    internal static NetConfig ParseNet(string text, int index)
    {
        string? tap = null;
        byte[] mac = DefaultMac(index);
        foreach (var part in text.Split(',', StringSplitOptions.RemoveEmptyEntries))
        {
            var kv = part.Split('=', 2);
            switch (kv[0])
            {
                case "tap" when kv.Length == 2:
                    tap = kv[1].Length == 0 ? null : kv[1];
                    if (tap is { Length: > MaxTapName })
                        throw new ArgumentException($"--net: TAP name '{tap}' is longer than {MaxTapName} characters");
                    break;
                case "mac" when kv.Length == 2:
                    mac = ParseMac(kv[1], "--net");
                    break;
                default:
                    throw new ArgumentException($"--net: unknown setting '{part}' (use tap=NAME,mac=XX:XX:XX:XX:XX:XX)");
            }
        }
        return new NetConfig(tap, mac);
    }

    /// <summary>IFNAMSIZ (16) less the terminating NUL.</summary>
    internal const int MaxTapName = 15;

    /// <summary>Locally administered, unicast; the index keeps several NICs of one VM apart.</summary>
    internal static byte[] DefaultMac(int index) =>
        [0x52, 0x54, 0x00, (byte)Random.Shared.Next(256), (byte)Random.Shared.Next(256), (byte)index];

    /// <summary>Parses <c>52:54:00:12:34:56</c> (either case); a multicast address is refused.
    /// <paramref name="what"/> starts the error message (the option or the JSON path).</summary>
    internal static byte[] ParseMac(string text, string what)
    {
        var bytes = text.Split(':');
        var mac = new byte[6];
        if (bytes.Length != 6)
            throw new ArgumentException($"{what}: '{text}' is not a MAC address like 52:54:00:12:34:56");
        for (int i = 0; i < 6; i++)
        {
            if (bytes[i].Length != 2 || !byte.TryParse(bytes[i], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out mac[i]))
                throw new ArgumentException($"{what}: '{text}' is not a MAC address like 52:54:00:12:34:56");
        }
        if ((mac[0] & 1) != 0)
            throw new ArgumentException($"{what}: {text} is a multicast address; a NIC needs a unicast one");
        return mac;
    }

    /// <summary>Parses 512M, 5G, 1T, 4096 (bytes), 64K; binary units like QEMU's -m.</summary>
    internal static ulong ParseSize(string text, string option)
    {
        string t = text.Trim();
        int shift = 0;
        if (t.Length > 0 && char.IsLetter(t[^1]))
        {
            shift = char.ToUpperInvariant(t[^1]) switch
            {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => throw new ArgumentException($"{option}: unknown size suffix in '{text}' (use K, M, G or T)"),
            };
            t = t[..^1];
        }
        else if (option == "--memory")
        {
            shift = 20; // a plain number is MiB, as with QEMU's -m
        }
        if (!ulong.TryParse(t, NumberStyles.None, CultureInfo.InvariantCulture, out ulong n) || n == 0)
            throw new ArgumentException($"{option}: '{text}' is not a size");
        if (n > (ulong.MaxValue >> shift))
            throw new ArgumentException($"{option}: '{text}' is too large");
        return n << shift;
    }
}
