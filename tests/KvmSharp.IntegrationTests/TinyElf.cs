using System.Buffers.Binary;

namespace KvmSharp.IntegrationTests;

/// <summary>
/// Writes a minimal ELF64 "kernel": one PT_LOAD at 1 MiB with the given code, and a PT_NOTE with the
/// Xen PVH entry note (type 18) pointing at the same code, so it boots through either entry.
/// </summary>
internal static class TinyElf
{
    private const ulong LoadAddress = 0x100000;

    /// <summary>mov dx,0xf4; mov al,v; out dx,al; then spin — the same bytes in 32- and 64-bit mode.</summary>
    public static byte[] DebugExitCode(byte value) => [0x66, 0xBA, 0xF4, 0x00, 0xB0, value, 0xEE, 0xEB, 0xFE];

    public static string Write(byte[] code)
    {
        const int EhSize = 64, PhSize = 56, PhNum = 2;
        int noteOffset = EhSize + PhSize * PhNum;
        byte[] note = new byte[20];
        BinaryPrimitives.WriteUInt32LittleEndian(note, 4);         // namesz
        BinaryPrimitives.WriteUInt32LittleEndian(note.AsSpan(4), 4);  // descsz
        BinaryPrimitives.WriteUInt32LittleEndian(note.AsSpan(8), 18); // XEN_ELFNOTE_PHYS32_ENTRY
        "Xen\0"u8.CopyTo(note.AsSpan(12));
        int codeOffset = 0x1000;
        BinaryPrimitives.WriteUInt32LittleEndian(note.AsSpan(16), (uint)LoadAddress);
        byte[] file = new byte[codeOffset + code.Length];
        var f = file.AsSpan();
        f[0] = 0x7F; f[1] = (byte)'E'; f[2] = (byte)'L'; f[3] = (byte)'F';
        f[4] = 2; f[5] = 1; f[6] = 1;                                  // ELFCLASS64, little endian, version
        BinaryPrimitives.WriteUInt16LittleEndian(f[16..], 2);          // ET_EXEC
        BinaryPrimitives.WriteUInt16LittleEndian(f[18..], 62);         // EM_X86_64
        BinaryPrimitives.WriteUInt32LittleEndian(f[20..], 1);
        BinaryPrimitives.WriteUInt64LittleEndian(f[24..], LoadAddress); // e_entry
        BinaryPrimitives.WriteUInt64LittleEndian(f[32..], EhSize);      // e_phoff
        BinaryPrimitives.WriteUInt16LittleEndian(f[52..], EhSize);
        BinaryPrimitives.WriteUInt16LittleEndian(f[54..], PhSize);
        BinaryPrimitives.WriteUInt16LittleEndian(f[56..], PhNum);
        // PT_LOAD
        var ph = f[EhSize..];
        BinaryPrimitives.WriteUInt32LittleEndian(ph, 1);
        BinaryPrimitives.WriteUInt32LittleEndian(ph[4..], 5);          // R+X
        BinaryPrimitives.WriteUInt64LittleEndian(ph[8..], (ulong)codeOffset);
        BinaryPrimitives.WriteUInt64LittleEndian(ph[16..], LoadAddress);
        BinaryPrimitives.WriteUInt64LittleEndian(ph[24..], LoadAddress);
        BinaryPrimitives.WriteUInt64LittleEndian(ph[32..], (ulong)code.Length);
        BinaryPrimitives.WriteUInt64LittleEndian(ph[40..], (ulong)code.Length);
        BinaryPrimitives.WriteUInt64LittleEndian(ph[48..], 0x1000);
        // PT_NOTE
        ph = f[(EhSize + PhSize)..];
        BinaryPrimitives.WriteUInt32LittleEndian(ph, 4);
        BinaryPrimitives.WriteUInt64LittleEndian(ph[8..], (ulong)noteOffset);
        BinaryPrimitives.WriteUInt64LittleEndian(ph[32..], (ulong)note.Length);
        BinaryPrimitives.WriteUInt64LittleEndian(ph[40..], (ulong)note.Length);
        BinaryPrimitives.WriteUInt64LittleEndian(ph[48..], 4);
        note.CopyTo(f[noteOffset..]);
        code.CopyTo(f[codeOffset..]);
        string path = Path.Combine(Path.GetTempPath(), $"kvmsharp-tiny-{Environment.ProcessId}-{Guid.NewGuid():N}.elf");
        File.WriteAllBytes(path, file);
        return path;
    }
}
