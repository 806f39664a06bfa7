namespace KvmSharp.Devices;

/// <summary>
/// Lets a test guest end the VM with a status, like QEMU's <c>isa-debug-exit</c> device
/// (conventionally at port 0xf4): any write of value v calls <c>exit(v)</c>.
/// </summary>
/// <remarks>
/// Only the first byte of a wider write is passed. QEMU turns v into the process exit status
/// <c>(v &lt;&lt; 1) | 1</c>; what the status becomes is the callback's choice. The callback runs
/// on the writing vCPU thread and should only ask the VMM to stop. Reads return 0.
/// </remarks>
public sealed class DebugExit : IBusDevice
{
    private readonly Action<byte> _exit;

    /// <summary>Creates the device.</summary>
    /// <exception cref="ArgumentNullException"><paramref name="exit"/> is null.</exception>
    public DebugExit(Action<byte> exit)
    {
        ArgumentNullException.ThrowIfNull(exit);
        _exit = exit;
    }

    /// <inheritdoc/>
    public void Read(ulong offset, Span<byte> data) => data.Clear();

    /// <inheritdoc/>
    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        if (!data.IsEmpty)
            _exit(data[0]);
    }
}
