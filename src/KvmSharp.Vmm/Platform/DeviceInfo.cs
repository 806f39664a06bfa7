namespace KvmSharp.Vmm.Platform;

/// <summary>Which address space a device's range is on.</summary>
internal enum BusKind
{
    /// <summary>Port I/O (x86 IN/OUT).</summary>
    Pio,

    /// <summary>Memory-mapped I/O.</summary>
    Mmio,
}

/// <summary>
/// One device the <see cref="DeviceManager"/> placed: what it is, where, and on which interrupt.
/// The list of these is the machine as wired (tests compare it with what the ACPI and MP tables
/// say; state save will walk it).
/// </summary>
/// <param name="Name">A stable name: "com1", "i8042", "rtc", "acpi-pm", "pci-config", "ecam", "virtio-pci@00:01.0", "virtio-mmio@0xe1000000" …</param>
/// <param name="Device">The model object (an <c>IBusDevice</c>, <c>IPciDevice</c> or transport).</param>
/// <param name="Bus">The bus its range is on.</param>
/// <param name="Base">First port or guest-physical address (for a PCI device, its slot's ECAM base is not listed; BARs move).</param>
/// <param name="Length">Ports or bytes claimed.</param>
/// <param name="Gsi">The GSI its interrupt line raises, or null.</param>
internal sealed record DeviceInfo(string Name, object Device, BusKind Bus, ulong Base, ulong Length, uint? Gsi);
