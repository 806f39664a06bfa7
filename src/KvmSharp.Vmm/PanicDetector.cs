namespace KvmSharp.Vmm;

/// <summary>
/// Watches the serial console for Linux's panic banner ("Kernel panic - not syncing"), so a panic
/// that is followed by a reboot (panic=N) still ends the VM with the panic exit code. Byte-wise
/// matching with no allocation; until ACPI brings pvpanic this is the only panic signal a guest gives.
/// </summary>
internal sealed class PanicDetector
{
    private static readonly byte[] Pattern = "Kernel panic - not syncing"u8.ToArray();
    private int _matched;

    public bool Seen { get; private set; }

    public void Feed(byte b)
    {
        if (Seen)
            return;
        if (b == Pattern[_matched])
        {
            if (++_matched == Pattern.Length)
                Seen = true;
        }
        else
        {
            // The pattern has no proper prefix that is also a suffix, so a mismatch restarts at 0 or 1.
            _matched = b == Pattern[0] ? 1 : 0;
        }
    }
}
