namespace KvmSharp.Boot;

/// <summary>How the kernel file is packaged.</summary>
public enum KernelFormat
{
    /// <summary>A bzImage: real-mode setup + 32/64-bit protected-mode part with a compressed payload (boot.rst).</summary>
    BzImage,

    /// <summary>An uncompressed ELF64 vmlinux.</summary>
    Elf,
}

/// <summary>
/// A parsed and validated kernel file. Parsing reads every header field once and checks it with
/// overflow-safe arithmetic (style.md §5; Linux boot protocol, Documentation/arch/x86/boot.rst).
/// For a bzImage the compressed payload is decompressed at parse time, so <see cref="HasPvhEntry"/>
/// can be answered and a corrupt payload is reported early; if it cannot be decompressed the
/// kernel can still be booted with <see cref="BootOptions.DecompressInVmm"/> off.
/// </summary>
public sealed class KernelImage
{
    /// <summary>Offset of struct setup_header in the bzImage and in struct boot_params.</summary>
    internal const int SetupHeaderOffset = 0x1f1;

    /// <summary>End of the setup_header fields we know (kernel_info_offset ends at 0x26c, protocol 2.15).</summary>
    internal const int SetupHeaderKnownEnd = 0x26c;

    internal const uint HdrSMagic = 0x53726448; // "HdrS"
    internal const ushort BootFlagMagic = 0xAA55;

    /// <summary>Older setup headers lack cmdline_size; such kernels accept 255 bytes (boot.rst: cmdline_size).</summary>
    private const uint LegacyCommandLineMax = 255;

    /// <summary>COMMAND_LINE_SIZE (2048) minus the NUL, for an ELF vmlinux, which has no setup header to ask.</summary>
    internal const uint ElfCommandLineMax = 2047;

    private readonly byte[] _data;
    private readonly ElfKernel? _elf;
    private readonly BootException? _payloadError;

    private KernelImage(string name, byte[] data, KernelFormat format, ElfKernel? elf, BootException? payloadError)
    {
        Name = name;
        _data = data;
        Format = format;
        _elf = elf;
        _payloadError = payloadError;
    }

    /// <summary>The file name or label used in messages.</summary>
    public string Name { get; }

    public KernelFormat Format { get; }

    /// <summary>Boot protocol version from the setup header (0x020f = 2.15); 0 for an ELF.</summary>
    public ushort BootProtocolVersion { get; private init; }

    /// <summary>bzImage payload compression: "gzip", "xz", "lzma", "bzip2", "zstd", "lz4", "lzo", "none"; null for an ELF or a protocol before 2.08 (no payload fields).</summary>
    public string? Compression { get; private init; }

    /// <summary>The ELF (or the bzImage's decompressed payload) carries XEN_ELFNOTE_PHYS32_ENTRY.</summary>
    public bool HasPvhEntry => _elf?.PvhEntry is not null;

    /// <summary>Longest command line the kernel accepts, without the NUL (setup_header.cmdline_size; 2047 for an ELF).</summary>
    public uint CommandLineMax { get; private init; }

    /// <summary>setup_header.xloadflags (protocol 2.12+); bit 0 XLF_KERNEL_64 means the 64-bit entry at load address + 0x200 exists.</summary>
    public ushort XLoadFlags { get; private init; }

    /// <summary>Highest address the initrd may occupy (setup_header.initrd_addr_max; 0x7fffffff for an ELF).</summary>
    public uint InitrdAddressMax { get; private init; } = 0x7fffffff;

    /// <summary>Required alignment of the protected-mode part when relocated (setup_header.kernel_alignment).</summary>
    public uint KernelAlignment { get; private init; } = 0x1000000;

    public bool Relocatable { get; private init; }

    /// <summary>Preferred load address of the protected-mode part (setup_header.pref_address, 2.10+).</summary>
    public ulong PreferredAddress { get; private init; } = 0x100000;

    /// <summary>Bytes of memory the kernel needs from its load address while it boots (setup_header.init_size, 2.10+).</summary>
    public uint InitSize { get; private init; }

    /// <summary>Size of the real-mode setup part: (setup_sects + 1) * 512.</summary>
    internal int SetupSize { get; private init; }

    /// <summary>The setup header bytes [0x1f1, end) as the kernel defines them (end = 0x202 + byte at 0x201).</summary>
    internal ReadOnlySpan<byte> SetupHeader => _data.AsSpan(SetupHeaderOffset, SetupHeaderLength);

    internal int SetupHeaderLength { get; private init; }

    /// <summary>The protected-mode part (bzImage only).</summary>
    internal ReadOnlySpan<byte> ProtectedModeCode => _data.AsSpan(SetupSize);

    /// <summary>The ELF to load: the file itself, or the bzImage's decompressed payload.</summary>
    /// <exception cref="BootException">The bzImage payload could not be decompressed.</exception>
    internal ElfKernel Elf => _elf ?? throw _payloadError ?? new BootException($"The kernel {Name} has no payload that KvmSharp can decompress.");

    /// <summary>
    /// Throws now what <see cref="LinuxLoader.Load"/> would throw for a bzImage whose payload cannot be
    /// decompressed (corrupt, unknown format, larger than init_size or the guest's RAM), so a VMM can
    /// refuse it before it creates a guest. Nothing to check for an ELF or when the kernel decompresses itself.
    /// </summary>
    /// <exception cref="BootException">The payload cannot be decompressed here.</exception>
    public void EnsureDecompressible() => _ = Elf;

    /// <summary>The ELF file bytes the segments refer to.</summary>
    internal byte[] ElfBytes { get; private init; } = [];

    /// <summary>A kernel file is read into the VMM's memory whole (an ELF: up to the end of what its
    /// program headers refer to); no kernel is near this, and a managed array could not hold 2 GiB.</summary>
    internal const int MaxFileBytes = 1 << 30;

    /// <summary>Enough of the file for the ELF header and the program headers of any vmlinux.</summary>
    private const int HeadBytes = 64 << 10;

    /// <summary>Reads and parses a kernel file.</summary>
    /// <param name="path">The bzImage or ELF vmlinux.</param>
    /// <param name="maxLoadBytes">Guest RAM the kernel can occupy (low RAM above 1 MiB). The bytes read
    /// from the file and the decompressed payload are checked against it before they are read or
    /// produced, so a huge or endless file costs the host nothing.</param>
    /// <exception cref="BootException">The file is missing, unreadable, not a regular file, larger than
    /// the guest can hold, or not a valid bzImage or ELF vmlinux.</exception>
    public static KernelImage Load(string path, ulong maxLoadBytes = ulong.MaxValue)
    {
        using var f = BootFile.Open(path, "kernel");
        long length = f.Length;
        ulong bound = Math.Min(maxLoadBytes, MaxFileBytes);

        // An ELF vmlinux may carry symbols and debug info that are never loaded (hundreds of MiB):
        // only the bytes up to the end of its last segment or note are read and counted.
        byte[] head = new byte[Math.Min(length, HeadBytes)];
        BootFile.ReadExactly(f, 0, head, "kernel");
        long needed = length;
        if (ElfKernel.HasElfMagic(head) && ElfKernel.FileExtent(head) is { } extent && extent < (ulong)length)
            needed = (long)extent;
        if ((ulong)needed > bound)
        {
            throw new BootException(maxLoadBytes < MaxFileBytes
                ? $"Memory is too small for the kernel file {path}: it is {needed} bytes, more than the {maxLoadBytes >> 20} MiB of guest RAM it can be loaded into."
                : $"The kernel file {path} is {needed} bytes, more than KvmSharp's {MaxFileBytes >> 20} MiB limit for a kernel file.");
        }
        byte[] data = new byte[needed];
        head.AsSpan(0, (int)Math.Min(head.Length, needed)).CopyTo(data);
        if (needed > head.Length)
            BootFile.ReadExactly(f, head.Length, data.AsSpan(head.Length), "kernel");
        return Parse(data, path, maxLoadBytes);
    }

    /// <summary>Parses a kernel held in memory.</summary>
    /// <param name="data">The whole file.</param>
    /// <param name="name">The file's name, for messages.</param>
    /// <param name="maxLoadBytes">Guest RAM the kernel can occupy; a bzImage payload that would
    /// decompress to more is refused as soon as its size claim or its output passes it.</param>
    /// <exception cref="BootException">Not a valid bzImage or ELF vmlinux.</exception>
    public static KernelImage Parse(byte[] data, string name, ulong maxLoadBytes = ulong.MaxValue)
    {
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(name);
        if (ElfKernel.HasElfMagic(data))
        {
            var elf = ElfKernel.Parse(data, name);
            return new KernelImage(name, data, KernelFormat.Elf, elf, null)
            {
                CommandLineMax = ElfCommandLineMax,
                ElfBytes = data,
            };
        }
        return ParseBzImage(data, name, OutputLimit.Default.AtMost(maxLoadBytes, $"the {maxLoadBytes >> 20} MiB of guest RAM it can be loaded into", guestRam: true));
    }

    private static KernelImage ParseBzImage(byte[] data, string name, OutputLimit limit)
    {
        // boot.rst "THE REAL-MODE KERNEL HEADER": boot_flag at 0x1fe, header "HdrS" at 0x202.
        if (data.Length < 0x206 || Le.U16(data, 0x1fe) != BootFlagMagic || Le.U32(data, 0x202) != HdrSMagic)
            throw new BootException($"The kernel file {name} is not a bzImage or ELF vmlinux.");
        if (data.Length < SetupHeaderKnownEnd)
            throw new BootException($"Kernel is truncated: {name} is {data.Length} bytes, shorter than its setup header.");
        ushort version = Le.U16(data, 0x206);
        if (version < 0x0206)
            throw new BootException($"The kernel {name} uses boot protocol {Version(version)}; KvmSharp needs 2.06 or later.");

        int setupSects = data[0x1f1] == 0 ? 4 : data[0x1f1];
        int setupSize = checked((setupSects + 1) * 512);
        if (setupSize >= data.Length)
            throw new BootException($"Kernel is truncated: {name} declares {setupSize} bytes of setup code but the file is {data.Length} bytes.");
        int pmLength = data.Length - setupSize;

        // setup_header length: 0x202 + the jump offset byte at 0x201 (boot.rst "Details of header fields").
        int headerEnd = Math.Min(0x202 + data[0x201], SetupHeaderKnownEnd);
        headerEnd = Math.Max(headerEnd, 0x238 + 4); // 2.06 defines fields up to cmdline_size
        ulong sysSize = (ulong)Le.U32(data, 0x1f4) * 16;
        if (sysSize > (ulong)pmLength)
            throw new BootException($"Kernel is truncated: {name}'s header says the protected-mode code is {sysSize} bytes but only {pmLength} follow the setup code.");

        uint cmdlineSize = Le.U32(data, 0x238);
        uint initrdMax = Le.U32(data, 0x22c);
        uint align = Le.U32(data, 0x230);
        bool relocatable = data[0x234] != 0;
        ushort xloadflags = version >= 0x020c ? Le.U16(data, 0x236) : (ushort)0;
        ulong pref = version >= 0x020a ? Le.U64(data, 0x258) : 0x100000;
        uint initSize = version >= 0x020a ? Le.U32(data, 0x260) : 0;

        string? compression = null;
        ElfKernel? elf = null;
        BootException? payloadError = null;
        byte[] elfBytes = [];
        if (version >= 0x0208)
        {
            uint payloadOffset = Le.U32(data, 0x248);
            uint payloadLength = Le.U32(data, 0x24c);
            if ((ulong)payloadOffset + payloadLength > (ulong)pmLength || payloadLength == 0)
                throw new BootException($"The kernel {name}'s payload [{payloadOffset}, +{payloadLength}) is not inside its {pmLength}-byte protected-mode part.");
            int start = setupSize + (int)payloadOffset;
            compression = PayloadDecompressor.Detect(data.AsSpan(start, (int)payloadLength));
            if (compression is null)
            {
                payloadError = new BootException($"The kernel {name}'s payload is in an unknown compression format.");
            }
            else
            {
                try
                {
                    // boot.rst init_size (2.10+): the memory the kernel needs from its load address while
                    // it boots. It is at least the decompressed size (arch/x86/boot/header.S: ZO_INIT_SIZE
                    // includes z_output_len), so an honest payload never produces more.
                    if (version >= 0x020a && initSize != 0)
                        limit = limit.AtMost(initSize, $"its setup header's init_size");
                    elfBytes = PayloadDecompressor.Decompress(data, start, (int)payloadLength, compression, name, limit);
                    if (!ElfKernel.HasElfMagic(elfBytes))
                        throw new BootException($"The kernel {name}'s decompressed payload is not an ELF vmlinux.");
                    elf = ElfKernel.Parse(elfBytes, name + " (decompressed payload)");
                }
                catch (BootException ex)
                {
                    payloadError = ex;
                    elfBytes = [];
                }
            }
        }
        else
        {
            payloadError = new BootException($"The kernel {name} uses boot protocol {Version(version)}, which has no payload fields (2.08+) for in-VMM decompression.");
        }

        return new KernelImage(name, data, KernelFormat.BzImage, elf, payloadError)
        {
            BootProtocolVersion = version,
            Compression = compression,
            CommandLineMax = version >= 0x0206 ? cmdlineSize : LegacyCommandLineMax,
            XLoadFlags = xloadflags,
            InitrdAddressMax = initrdMax,
            KernelAlignment = align,
            Relocatable = relocatable,
            PreferredAddress = pref,
            InitSize = initSize,
            SetupSize = setupSize,
            SetupHeaderLength = headerEnd - SetupHeaderOffset,
            ElfBytes = elfBytes,
        };
    }

    internal static string Version(ushort v) => $"{v >> 8}.{v & 0xff:D2}";

    /// <summary>One line for logs, e.g. "bzImage protocol 2.15, xz payload, PVH entry".</summary>
    public override string ToString() => Format == KernelFormat.Elf
        ? $"ELF vmlinux{(HasPvhEntry ? ", PVH entry" : "")}"
        : $"bzImage protocol {Version(BootProtocolVersion)}, {Compression ?? "unknown"} payload{(_elf is null ? " (not decompressible here)" : "")}{(HasPvhEntry ? ", PVH entry" : "")}";
}
