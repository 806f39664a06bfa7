using System.Text.Json.Serialization;

namespace KvmSharp.Cli;

// The JSON shape of `kvmsharp run --config FILE`: Firecracker's --config-file sections and field
// names (boot-source, drives, network-interfaces, machine-config, balloon, entropy), plus a
// `kvmsharp` section for what Firecracker has no field for. `required` members are required keys;
// nullable members may be absent or null. Unknown keys are rejected (see ConfigFile.CheckShape).

internal sealed class ConfigFileModel
{
    [JsonPropertyName("boot-source")]
    public required BootSourceSection BootSource { get; set; }

    public List<DriveSection>? Drives { get; set; }

    [JsonPropertyName("network-interfaces")]
    public List<NetworkInterfaceSection>? NetworkInterfaces { get; set; }

    [JsonPropertyName("machine-config")]
    public MachineConfigSection? MachineConfig { get; set; }

    public BalloonSection? Balloon { get; set; }

    public EntropySection? Entropy { get; set; }

    public KvmSharpSection? Kvmsharp { get; set; }
}

internal sealed class BootSourceSection
{
    public required string KernelImagePath { get; set; }
    public string? InitrdPath { get; set; }
    public string? BootArgs { get; set; }
}

internal sealed class DriveSection
{
    public required string DriveId { get; set; }
    public required string PathOnHost { get; set; }
    public bool? IsReadOnly { get; set; }

    /// <summary>Firecracker's flag that appends root=/dev/vda; kvmsharp only accepts false.</summary>
    public bool? IsRootDevice { get; set; }

    /// <summary>kvmsharp extension: raw or qcow2 (default: probed).</summary>
    public string? Format { get; set; }
}

internal sealed class NetworkInterfaceSection
{
    public required string IfaceId { get; set; }
    public required string HostDevName { get; set; }
    public string? GuestMac { get; set; }
}

internal sealed class MachineConfigSection
{
    public required int VcpuCount { get; set; }
    public required int MemSizeMib { get; set; }

    /// <summary>Only false: every vCPU is its own core.</summary>
    public bool? Smt { get; set; }

    /// <summary>"None" or "2M" (hugetlbfs pages of the host's default size, 2 MiB on x86-64).</summary>
    public string? HugePages { get; set; }

    /// <summary>Only false: there is no dirty-page log (no snapshots).</summary>
    public bool? TrackDirtyPages { get; set; }
}

internal sealed class BalloonSection
{
    public required long AmountMib { get; set; }

    /// <summary>Only false: the device does not offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (as Firecracker's default).</summary>
    public bool? DeflateOnOom { get; set; }

    /// <summary>Only 0: kvmsharp does not poll balloon statistics.</summary>
    public int? StatsPollingIntervalS { get; set; }
}

/// <summary>Present (even empty) = a virtio-rng device.</summary>
internal sealed class EntropySection;

internal sealed class KvmSharpSection
{
    public string? Console { get; set; }
    public string? Transport { get; set; }
    public bool? Acpi { get; set; }
    public string? CpuTemplate { get; set; }
    public bool? DebugExit { get; set; }
    public bool? Pvh { get; set; }
    public string? Pvm { get; set; }
    public bool? KernelDecompress { get; set; }
    public bool? Ksm { get; set; }
    public bool? Prefault { get; set; }
}

/// <summary>Source-generated metadata: the CLI is NativeAOT, so no reflection-based serialization.</summary>
[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower,
    UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
    RespectNullableAnnotations = true,
    RespectRequiredConstructorParameters = true)]
[JsonSerializable(typeof(ConfigFileModel))]
internal sealed partial class ConfigFileJsonContext : JsonSerializerContext;
