using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using KvmSharp.Vmm;

namespace KvmSharp.Cli;

/// <summary>
/// <c>kvmsharp run --config FILE</c>: a JSON file in the shape of Firecracker's <c>--config-file</c>
/// (see <see cref="ConfigFileModel"/> and src/KvmSharp.Cli/README.md) turned into a <see cref="VmConfig"/>.
/// <para>Every problem is one line that names the file and the JSON path of the offending value,
/// e.g. <c>vm.json: drives[1].path_on_host: missing</c>. Format and value errors are
/// <see cref="ArgumentException"/>s (usage, exit 2); a kernel, initrd or disk image that does not
/// exist is a <see cref="VmConfigException"/> (exit 1), as it is for the command-line options.</para>
/// <para>Relative paths in the file are relative to the file's own directory.</para>
/// </summary>
internal static class ConfigFile
{
    /// <summary>A VM description is a few hundred bytes; anything near this is not one.</summary>
    private const int MaxFileBytes = 1 << 20;

    /// <summary>virtio-blk's serial field (VIRTIO_BLK_ID_BYTES, virtio 1.2 §5.2.6, VIRTIO_BLK_T_GET_ID).</summary>
    private const int MaxDriveId = 20;

    private const int MinMemMib = (int)(VmConfig.MinMemoryBytes >> 20);
    private const int MaxMemMib = (int)(VmConfig.MaxMemoryBytes >> 20);

    /// <exception cref="ArgumentException">The file is absent, unreadable, larger than 1 MiB, not JSON, or not a valid VM description.</exception>
    /// <exception cref="VmConfigException">A kernel, initrd or disk image it names does not exist.</exception>
    public static VmConfig Load(string path)
    {
        byte[] bytes;
        bool seekable;
        try
        {
            if (Directory.Exists(path))
                throw new ArgumentException($"{path}: is a directory, not a config file");
            // bufferSize 0: reads go straight into our buffer. A pipe (`--config <(…)`, /dev/stdin) has no
            // length and cannot seek, so the file is read to its end, never more than MaxFileBytes + 1 bytes:
            // /dev/zero or an endless pipe costs 1 MiB, not the host's memory.
            using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, bufferSize: 0);
            seekable = f.CanSeek;
            bytes = ReadBounded(f, MaxFileBytes, path);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new ArgumentException($"{path}: no such file", e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"{path}: cannot be read ({e.Message})", e);
        }
        // Relative paths are relative to the file, except for a pipe: /dev/fd/63's directory means
        // nothing to the user who wrote `--config <(…)`, so those resolve against the current directory.
        string baseDir = seekable ? Path.GetDirectoryName(Path.GetFullPath(path)) ?? "/" : Directory.GetCurrentDirectory();
        return Parse(bytes, path, baseDir);
    }

    /// <summary>Reads <paramref name="f"/> to its end, refusing it as soon as it holds more than
    /// <paramref name="max"/> bytes; the length a regular file reports is only a first guess.</summary>
    private static byte[] ReadBounded(Stream f, int max, string path)
    {
        byte[] buffer = new byte[f.CanSeek ? (int)Math.Clamp(f.Length + 1, 1, max + 1L) : 64 << 10];
        int n = 0;
        while (true)
        {
            if (n == buffer.Length)
            {
                if (n > max)
                    throw new ArgumentException($"{path}: is larger than {max} bytes; a config file is at most {max} bytes");
                Array.Resize(ref buffer, Math.Min(buffer.Length * 2, max + 1));
            }
            int r = f.Read(buffer, n, buffer.Length - n);
            if (r == 0)
                break;
            n += r;
        }
        Array.Resize(ref buffer, n);
        return buffer;
    }

    /// <summary>Parses the file's bytes; <paramref name="name"/> starts every error message and
    /// relative paths are resolved against <paramref name="baseDir"/>.</summary>
    /// <exception cref="ArgumentException">Not JSON, or not a valid VM description.</exception>
    /// <exception cref="VmConfigException">A kernel, initrd or disk image it names does not exist.</exception>
    public static VmConfig Parse(ReadOnlySpan<byte> utf8, string name, string baseDir)
    {
        if (utf8.StartsWith("\xEF\xBB\xBF"u8))
            utf8 = utf8[3..];
        if (!System.Text.Unicode.Utf8.IsValid(utf8))
            throw new ArgumentException($"{name}: is not UTF-8 text (JSON is UTF-8, RFC 8259 §8.1)");
        if (utf8.Trim(" \t\r\n"u8).IsEmpty)
            throw new ArgumentException($"{name}: the file is empty; it needs at least {{\"boot-source\": {{\"kernel_image_path\": …}}}}");
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(utf8.ToArray(), new JsonDocumentOptions { MaxDepth = 16 });
        }
        catch (JsonException e)
        {
            // Keep the reader's first sentence: the rest is advice about reader options and the
            // "LineNumber: … | BytePositionInLine: …" suffix, which the line and column below replace.
            string why = e.Message;
            int cut = why.IndexOf(". ", StringComparison.Ordinal);
            if (cut > 0)
                why = why[..cut];
            throw new ArgumentException($"{name}: line {e.LineNumber + 1}, column {e.BytePositionInLine + 1}: not valid JSON: {why}", e);
        }

        using (document)
        {
            var context = ConfigFileJsonContext.Default;
            new ShapeChecker(name).Check(document.RootElement, context.ConfigFileModel, "");
            ConfigFileModel model;
            try
            {
                model = document.RootElement.Deserialize(context.ConfigFileModel)
                    ?? throw new ArgumentException($"{name}: the file is null, not a JSON object");
            }
            catch (JsonException e)
            {
                // ShapeChecker has already refused what the serializer refuses; this is a safety net.
                throw new ArgumentException($"{name}: {e.Path?.TrimStart('$').TrimStart('.')}: invalid value", e);
            }
            return new Converter(name, baseDir).ToVmConfig(model);
        }
    }

    /// <summary>
    /// Checks the document against the source-generated contract before deserializing, so that each
    /// error names the JSON path in the file's own terms ("drives[1].path_on_host: missing") instead of
    /// the serializer's .NET type names. The contract (key names, required keys, nullability, element
    /// types) comes from <see cref="ConfigFileJsonContext"/>'s metadata: there is one schema, the model.
    /// </summary>
    private readonly struct ShapeChecker(string name)
    {
        public void Check(JsonElement e, JsonTypeInfo info, string path)
        {
            switch (info.Kind)
            {
                case JsonTypeInfoKind.Object:
                    CheckObject(e, info, path);
                    break;
                case JsonTypeInfoKind.Enumerable:
                    if (e.ValueKind != JsonValueKind.Array)
                        throw Error(path, $"expected an array, got {Describe(e)}");
                    var elementInfo = info.Options.GetTypeInfo(info.ElementType!);
                    int i = 0;
                    foreach (var item in e.EnumerateArray())
                        Check(item, elementInfo, $"{path}[{i++}]");
                    break;
                default:
                    CheckValue(e, Nullable.GetUnderlyingType(info.Type) ?? info.Type, path);
                    break;
            }
        }

        private void CheckObject(JsonElement e, JsonTypeInfo info, string path)
        {
            if (e.ValueKind != JsonValueKind.Object)
                throw Error(path, $"expected an object, got {Describe(e)}");
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var p in e.EnumerateObject())
            {
                string child = path.Length == 0 ? p.Name : $"{path}.{p.Name}";
                if (!seen.Add(p.Name))
                    throw Error(child, "duplicate key");
                JsonPropertyInfo? property = null;
                foreach (var candidate in info.Properties)
                {
                    if (candidate.Name == p.Name)
                        property = candidate;
                }
                if (property is null)
                {
                    string known = string.Join(", ", info.Properties.Select(x => x.Name));
                    throw Error(child, known.Length == 0 ? "unknown key (this section takes no keys)" : $"unknown key (known: {known})");
                }
                if (p.Value.ValueKind == JsonValueKind.Null)
                {
                    if (property.IsRequired || !property.IsSetNullable)
                        throw Error(child, "must not be null");
                    continue;
                }
                Check(p.Value, info.Options.GetTypeInfo(property.PropertyType), child);
            }
            foreach (var property in info.Properties)
            {
                if (property.IsRequired && !seen.Contains(property.Name))
                    throw Error(path.Length == 0 ? property.Name : $"{path}.{property.Name}", "missing");
            }
        }

        private void CheckValue(JsonElement e, Type type, string path)
        {
            bool ok;
            string expected;
            if (type == typeof(string))
            {
                (ok, expected) = (e.ValueKind == JsonValueKind.String, "a string");
            }
            else if (type == typeof(bool))
            {
                (ok, expected) = (e.ValueKind is JsonValueKind.True or JsonValueKind.False, "true or false");
            }
            else if (type == typeof(int) || type == typeof(long))
            {
                ok = e.ValueKind == JsonValueKind.Number && (type == typeof(int) ? e.TryGetInt32(out _) : e.TryGetInt64(out _));
                expected = "a whole number";
                if (!ok && e.ValueKind == JsonValueKind.Number && e.TryGetDecimal(out decimal d) && decimal.Truncate(d) == d)
                    throw Error(path, $"{e.GetRawText()} is out of range");
            }
            else
            {
                throw new System.Diagnostics.UnreachableException($"ConfigFileModel has a member of type {type}, which the shape check does not know.");
            }
            if (!ok)
                throw Error(path, $"expected {expected}, got {Describe(e)}");
        }

        private ArgumentException Error(string path, string problem) =>
            new(path.Length == 0 ? $"{name}: {problem}" : $"{name}: {path}: {problem}");

        private static string Describe(JsonElement e) => e.ValueKind switch
        {
            JsonValueKind.Object => "an object",
            JsonValueKind.Array => "an array",
            JsonValueKind.String => "a string",
            JsonValueKind.Number => e.GetRawText().Length <= 24 ? e.GetRawText() : "a number",
            JsonValueKind.True => "true",
            JsonValueKind.False => "false",
            _ => "null",
        };
    }

    /// <summary>Values the JSON types cannot express: ranges, enumerations, MACs, unique ids, files.</summary>
    private readonly struct Converter(string name, string baseDir)
    {
        public VmConfig ToVmConfig(ConfigFileModel m)
        {
            // Files are checked last, so every usage error (exit 2) is reported before a missing file (exit 1).
            var files = new List<(string JsonPath, string FullPath)>();
            var boot = m.BootSource;
            string kernel = Resolve(boot.KernelImagePath, "boot-source.kernel_image_path", files);
            string? initrd = boot.InitrdPath is null ? null : Resolve(boot.InitrdPath, "boot-source.initrd_path", files);

            int cpus = 1;
            ulong memoryMib = 256;
            bool hugePages = false;
            if (m.MachineConfig is { } mc)
            {
                if (mc.VcpuCount < 1 || mc.VcpuCount > VmConfig.MaxVcpus)
                    throw Error("machine-config.vcpu_count", $"must be from 1 to {VmConfig.MaxVcpus}, not {mc.VcpuCount}");
                if (mc.MemSizeMib < MinMemMib || mc.MemSizeMib > MaxMemMib)
                    throw Error("machine-config.mem_size_mib", $"must be from {MinMemMib} to {MaxMemMib}, not {mc.MemSizeMib}");
                if (mc.Smt == true)
                    throw Error("machine-config.smt", "true is not supported (each vCPU is a core of its own); use false");
                if (mc.TrackDirtyPages == true)
                    throw Error("machine-config.track_dirty_pages", "true is not supported (kvmsharp keeps no dirty-page log); use false");
                hugePages = mc.HugePages switch
                {
                    null or "None" => false,
                    "2M" => true,
                    var h => throw Error("machine-config.huge_pages", $"takes \"None\" or \"2M\", not \"{h}\""),
                };
                cpus = mc.VcpuCount;
                memoryMib = (ulong)mc.MemSizeMib;
            }

            var disks = new List<DiskConfig>();
            var driveIds = new Dictionary<string, int>(StringComparer.Ordinal);
            for (int i = 0; i < (m.Drives?.Count ?? 0); i++)
            {
                var d = m.Drives![i];
                string at = $"drives[{i}]";
                if (d.DriveId.Length is 0 or > MaxDriveId || !d.DriveId.All(c => c is > ' ' and < '\x7f'))
                    throw Error($"{at}.drive_id", $"must be 1 to {MaxDriveId} printable ASCII characters without spaces (it becomes the disk's serial), not \"{d.DriveId}\"");
                if (!driveIds.TryAdd(d.DriveId, i))
                    throw Error($"{at}.drive_id", $"\"{d.DriveId}\" is already the id of drives[{driveIds[d.DriveId]}]");
                if (d.IsRootDevice == true)
                    throw Error($"{at}.is_root_device", "true is not supported; use false and put root=/dev/vdX in boot-source.boot_args");
                if (d.Format is not (null or "raw" or "qcow2"))
                    throw Error($"{at}.format", $"takes \"raw\" or \"qcow2\", not \"{d.Format}\"");
                disks.Add(new DiskConfig(Resolve(d.PathOnHost, $"{at}.path_on_host", files), d.IsReadOnly ?? false, d.DriveId, d.Format));
            }

            var nets = new List<NetConfig>();
            var ifaceIds = new Dictionary<string, int>(StringComparer.Ordinal);
            for (int i = 0; i < (m.NetworkInterfaces?.Count ?? 0); i++)
            {
                var n = m.NetworkInterfaces![i];
                string at = $"network-interfaces[{i}]";
                if (n.IfaceId.Length == 0)
                    throw Error($"{at}.iface_id", "must not be empty");
                if (!ifaceIds.TryAdd(n.IfaceId, i))
                    throw Error($"{at}.iface_id", $"\"{n.IfaceId}\" is already the id of network-interfaces[{ifaceIds[n.IfaceId]}]");
                if (n.HostDevName.Length is 0 or > RunCommand.MaxTapName)
                    throw Error($"{at}.host_dev_name", $"must be a TAP name of 1 to {RunCommand.MaxTapName} characters, not \"{n.HostDevName}\"");
                byte[] mac = n.GuestMac is null ? RunCommand.DefaultMac(i) : RunCommand.ParseMac(n.GuestMac, $"{name}: {at}.guest_mac");
                nets.Add(new NetConfig(n.HostDevName, mac));
            }

            ulong? balloon = null;
            if (m.Balloon is { } b)
            {
                if (b.AmountMib < 0)
                    throw Error("balloon.amount_mib", $"must not be negative, not {b.AmountMib}");
                if ((ulong)b.AmountMib >= memoryMib)
                    throw Error("balloon.amount_mib", $"{b.AmountMib} MiB would take all of the guest's {memoryMib} MiB");
                if (b.DeflateOnOom == true)
                    throw Error("balloon.deflate_on_oom", "true is not supported (the balloon does not offer deflate-on-OOM: inflated pages leave the guest's MemTotal); use false");
                if (b.StatsPollingIntervalS is { } s && s != 0)
                    throw Error("balloon.stats_polling_interval_s", $"statistics polling is not supported; use 0, not {s}");
                balloon = (ulong)b.AmountMib;
            }

            var k = m.Kvmsharp ?? new KvmSharpSection();
            bool virtioConsole = k.Console switch
            {
                null or "serial" => false,
                "virtio" => true,
                var c => throw Error("kvmsharp.console", $"takes \"serial\" or \"virtio\", not \"{c}\""),
            };
            bool mmio = k.Transport switch
            {
                null or "pci" => false,
                "mmio" => true,
                var t => throw Error("kvmsharp.transport", $"takes \"pci\" or \"mmio\", not \"{t}\""),
            };
            bool? pvm = k.Pvm switch
            {
                null or "auto" => null,
                "on" => true,
                "off" => false,
                var p => throw Error("kvmsharp.pvm", $"takes \"auto\", \"on\" or \"off\", not \"{p}\""),
            };
            var config = new VmConfig
            {
                KernelPath = kernel,
                InitrdPath = initrd,
                CommandLine = boot.BootArgs ?? "console=ttyS0",
                CpuCount = cpus,
                MemoryBytes = memoryMib << 20,
                CpuTemplate = k.CpuTemplate ?? "none",
                DecompressInVmm = !(k.KernelDecompress ?? false),
                PreferPvh = k.Pvh ?? false,
                PvmCompat = pvm,
                DebugExit = k.DebugExit ?? false,
                Acpi = k.Acpi ?? true,
                Rng = m.Entropy is not null,
                Disks = disks,
                Nets = nets,
                BalloonMiB = balloon,
                VirtioConsole = virtioConsole,
                VirtioMmio = mmio,
                Mergeable = k.Ksm ?? false,
                Prefault = k.Prefault ?? false,
                HugePages = hugePages,
            };
            if (config.CheckValues() is { } problem)
                throw InFile(problem);

            foreach (var (jsonPath, fullPath) in files)
            {
                if (!File.Exists(fullPath))
                    throw new VmConfigException($"{name}: {jsonPath}: {fullPath} does not exist");
            }
            return config;
        }

        /// <summary>A <see cref="VmConfig"/> problem in the file's terms: the JSON path that sets it.</summary>
        private ArgumentException InFile(VmConfigProblem p) => p.Setting switch
        {
            nameof(VmConfig.CpuCount) => Error("machine-config.vcpu_count", p.Problem),
            nameof(VmConfig.MemoryBytes) => Error("machine-config.mem_size_mib", p.Problem),
            nameof(VmConfig.BalloonMiB) => Error("balloon.amount_mib", p.Problem),
            nameof(VmConfig.CpuTemplate) => Error("kvmsharp.cpu_template", p.Problem),
            nameof(VmConfig.Acpi) => Error("kvmsharp.acpi", "false leaves no PCI bus for the virtio devices; set kvmsharp.transport to \"mmio\""),
            _ => new ArgumentException($"{name}: {p}"),
        };

        /// <summary>Resolves <paramref name="value"/> against the file's directory (an absolute path
        /// stays as it is) and adds it to the files to check.</summary>
        private string Resolve(string value, string path, List<(string, string)> files)
        {
            if (value.Length == 0)
                throw Error(path, "must not be empty");
            string full = Path.GetFullPath(value, baseDir);
            files.Add((path, full));
            return full;
        }

        private ArgumentException Error(string path, string problem) => new($"{name}: {path}: {problem}");
    }
}
