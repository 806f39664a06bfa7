namespace KvmSharp.Architecture.Tests;

/// <summary>One row of the layer table: an assembly, the KvmSharp assemblies it must not reach directly
/// or through another assembly, and those it may reach only through another one.</summary>
public sealed record LayerRule(string Assembly, string[] MustNotReference, string Why, string[]? MustNotReferenceDirectly = null);

/// <summary>
/// design.md "Layers" ("must not reference" column) as assembly names, plus the rule that a lower layer
/// never reaches a higher one (Vmm, Api and the Cli sit on top). README.md of this project shows the
/// same table in prose; change both together, and design.md first.
/// </summary>
public static class LayerRules
{
    public const string Interop = "KvmSharp.Interop";
    public const string Kvm = "KvmSharp.Kvm";
    public const string Memory = "KvmSharp.Memory";
    public const string Devices = "KvmSharp.Devices";
    public const string Boot = "KvmSharp.Boot";
    public const string Images = "KvmSharp.Images";
    public const string Vmm = "KvmSharp.Vmm";
    public const string Api = "KvmSharp.Api"; // not written yet; lower layers must not reach it either
    public const string Cli = "kvmsharp"; // KvmSharp.Cli's AssemblyName

    private static readonly string[] Top = [Vmm, Api, Cli];

    public static readonly LayerRule[] Table =
    [
        new(Interop, [Kvm, Memory, Devices, Boot, Images, .. Top], "libc P/Invokes reference nothing else"),
        new(Kvm, [Devices, .. Top], "the ioctl layer knows no device"),
        new(Memory, [Kvm, Devices, Boot, .. Top], "guest memory is plain mappings; registering them with KVM is the VMM's job"),
        new(Devices, [Kvm, .. Top], "device models never see a KVM file descriptor, only IBusDevice calls and interrupt lines"),
        new(Boot, [Devices, .. Top], "boot code writes guest memory and CPU state, it wires no device"),
        new(Images, [Kvm, Memory, Devices, Boot, .. Top], "disk images are usable without a VMM (kvmsharp img)"),
        new(Vmm, [Api, Cli], "the VMM is driven by front ends, it does not know them"),
        new(Cli, [], "the front end builds a VmConfig and runs a Vm; the parts behind them are the VMM's business",
            MustNotReferenceDirectly: [Kvm, Devices, Boot]),
    ];
}
