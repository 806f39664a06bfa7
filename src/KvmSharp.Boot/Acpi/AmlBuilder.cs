using System.Text;

namespace KvmSharp.Boot.Acpi;

/// <summary>
/// Writes ACPI Machine Language (ACPI 6.5 §20.2, "AML Grammar Definition") term by term, for the
/// DSDT/SSDT bodies. Objects with a PkgLength (Scope, Device, Method, Package, Buffer) are opened
/// with a <c>Begin…</c> call and closed with <see cref="End"/>, which back-patches the length;
/// a Package counts its elements itself.
/// </summary>
/// <example>
/// <code>
/// var a = new AmlBuilder();
/// a.BeginScope("\\_SB");
/// a.BeginDevice("COM1");
/// a.Name("_HID").EisaId("PNP0501");
/// a.End();
/// a.End();
/// byte[] aml = a.ToArray();
/// </code>
/// </example>
/// <remarks>
/// Misuse (a bad name, an unbalanced <see cref="End"/>) is a bug in our table code and throws
/// <see cref="ArgumentException"/> or <see cref="InvalidOperationException"/>: no guest input reaches here.
/// </remarks>
public sealed class AmlBuilder
{
    // Opcodes (ACPI 6.5 §20.3).
    internal const byte ZeroOp = 0x00, OneOp = 0x01, AliasOp = 0x06, NameOp = 0x08;
    internal const byte BytePrefix = 0x0A, WordPrefix = 0x0B, DWordPrefix = 0x0C, StringPrefix = 0x0D, QWordPrefix = 0x0E;
    internal const byte ScopeOp = 0x10, BufferOp = 0x11, PackageOp = 0x12, MethodOp = 0x14;
    internal const byte DualNamePrefix = 0x2E, MultiNamePrefix = 0x2F, ExtOpPrefix = 0x5B, DeviceOp = 0x82;
    internal const byte RootChar = 0x5C, ParentPrefixChar = 0x5E, ReturnOp = 0xA4, OnesOp = 0xFF;

    /// <summary>Largest value a PkgLength can encode (28 bits).</summary>
    public const int MaxPkgLength = (1 << 28) - 1;

    private enum Kind { Scope, Device, Method, Package, Buffer }

    private readonly record struct Frame(Kind Kind, int Start, int Elements);

    private static readonly System.Buffers.SearchValues<char> UpperHexDigits = System.Buffers.SearchValues.Create("0123456789ABCDEF");

    private readonly List<byte> _aml = new();
    private readonly Stack<Frame> _open = new();

    /// <summary>Bytes written so far (including still-open objects, without their PkgLength).</summary>
    public int Length => _aml.Count;

    /// <summary>The AML; every object must be closed.</summary>
    /// <exception cref="InvalidOperationException">An object opened with Begin… was not ended.</exception>
    public byte[] ToArray()
    {
        if (_open.Count != 0)
            throw new InvalidOperationException($"{_open.Count} AML object(s) were not ended (innermost: {_open.Peek().Kind}).");
        return _aml.ToArray();
    }

    /// <summary>DefScope: <c>Scope (path) { … }</c>.</summary>
    public AmlBuilder BeginScope(string path)
    {
        _aml.Add(ScopeOp);
        Open(Kind.Scope);
        WriteNameString(path);
        return this;
    }

    /// <summary>DefDevice: <c>Device (name) { … }</c>.</summary>
    public AmlBuilder BeginDevice(string name)
    {
        _aml.Add(ExtOpPrefix);
        _aml.Add(DeviceOp);
        Open(Kind.Device);
        WriteNameString(name);
        return this;
    }

    /// <summary>DefMethod: <c>Method (name, argCount, Serialized|NotSerialized) { … }</c>.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="argCount"/> is not 0–7.</exception>
    public AmlBuilder BeginMethod(string name, int argCount = 0, bool serialized = false)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(argCount);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(argCount, 7);
        _aml.Add(MethodOp);
        Open(Kind.Method);
        WriteNameString(name);
        _aml.Add((byte)(argCount | (serialized ? 0x08 : 0))); // MethodFlags: ArgCount[2:0], SerializeFlag[3], SyncLevel[7:4] = 0
        return this;
    }

    /// <summary>DefPackage: <c>Package () { … }</c>; NumElements is the number of data objects added before <see cref="End"/> (at most 255).</summary>
    public AmlBuilder BeginPackage()
    {
        CountElement();
        _aml.Add(PackageOp);
        Open(Kind.Package);
        return this;
    }

    /// <summary>Closes the innermost Scope, Device, Method or Package and writes its PkgLength.</summary>
    /// <exception cref="InvalidOperationException">Nothing is open, or a package has more than 255 elements.</exception>
    public AmlBuilder End()
    {
        if (_open.Count == 0)
            throw new InvalidOperationException("End() without an open AML object.");
        var f = _open.Pop();
        var insert = new List<byte>(5);
        if (f.Kind == Kind.Package)
        {
            if (f.Elements > 255)
                throw new InvalidOperationException($"A Package has {f.Elements} elements; PackageOp holds at most 255.");
            insert.Add((byte)f.Elements);
        }
        int body = _aml.Count - f.Start + insert.Count;
        insert.InsertRange(0, EncodePkgLength(body));
        _aml.InsertRange(f.Start, insert);
        return this;
    }

    /// <summary>NameOp and the name; the value must follow as the next term (<c>Name (_HID, …)</c>).</summary>
    public AmlBuilder Name(string name)
    {
        _aml.Add(NameOp);
        WriteNameString(name);
        return this;
    }

    /// <summary>ReturnOp; the value must follow as the next term.</summary>
    public AmlBuilder Return()
    {
        _aml.Add(ReturnOp);
        return this;
    }

    /// <summary>An integer in its shortest encoding: ZeroOp, OneOp, BytePrefix, WordPrefix, DWordPrefix or QWordPrefix.</summary>
    public AmlBuilder Integer(ulong value)
    {
        CountElement();
        if (value == 0)
        {
            _aml.Add(ZeroOp);
        }
        else if (value == 1)
        {
            _aml.Add(OneOp);
        }
        else if (value <= byte.MaxValue)
        {
            _aml.Add(BytePrefix);
            _aml.Add((byte)value);
        }
        else if (value <= ushort.MaxValue)
        {
            _aml.Add(WordPrefix);
            AddLe(value, 2);
        }
        else if (value <= uint.MaxValue)
        {
            _aml.Add(DWordPrefix);
            AddLe(value, 4);
        }
        else
        {
            _aml.Add(QWordPrefix);
            AddLe(value, 8);
        }
        return this;
    }

    /// <summary>A string literal (StringPrefix, ASCII 0x01–0x7F, NUL).</summary>
    /// <exception cref="ArgumentException">The string has a character outside 0x01–0x7F.</exception>
    public AmlBuilder String(string value)
    {
        ArgumentNullException.ThrowIfNull(value);
        foreach (char c in value)
        {
            if (c is '\0' or > '\x7f')
                throw new ArgumentException($"AML strings are ASCII 0x01-0x7F; got U+{(int)c:X4}.", nameof(value));
        }
        CountElement();
        _aml.Add(StringPrefix);
        _aml.AddRange(Encoding.ASCII.GetBytes(value));
        _aml.Add(0);
        return this;
    }

    /// <summary>A compressed EISA id (<c>EISAID ("PNP0A08")</c>) as a DWord integer.</summary>
    public AmlBuilder EisaId(string id)
    {
        uint v = EncodeEisaId(id);
        CountElement();
        _aml.Add(DWordPrefix);
        AddLe(v, 4);
        return this;
    }

    /// <summary>DefBuffer with the given bytes (<c>Buffer () { … }</c>; a ResourceTemplate is one).</summary>
    public AmlBuilder Buffer(ReadOnlySpan<byte> bytes)
    {
        CountElement();
        _aml.Add(BufferOp);
        Open(Kind.Buffer);
        Integer((ulong)bytes.Length);
        foreach (byte b in bytes)
            _aml.Add(b);
        return End();
    }

    /// <summary>A name reference as a term (a NameString, e.g. inside a Package).</summary>
    public AmlBuilder NameReference(string path)
    {
        CountElement();
        WriteNameString(path);
        return this;
    }

    /// <summary>
    /// PkgLength (ACPI 6.5 §20.2.4) for an object whose bytes after the PkgLength number
    /// <paramref name="bodyLength"/>: the encoded length counts the PkgLength bytes themselves.
    /// One byte holds up to 63; otherwise bits 7–6 of the lead byte give the count of following
    /// bytes (1–3), its bits 3–0 the low nibble, and each following byte the next 8 bits.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">The length does not fit in 28 bits.</exception>
    public static byte[] EncodePkgLength(int bodyLength)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bodyLength);
        if (bodyLength + 1 <= 0x3F)
            return [(byte)(bodyLength + 1)];
        for (int extra = 1; extra <= 3; extra++)
        {
            long total = (long)bodyLength + 1 + extra;
            if (total <= (1L << (4 + 8 * extra)) - 1)
            {
                byte[] r = new byte[1 + extra];
                r[0] = (byte)((extra << 6) | (int)(total & 0xF));
                for (int i = 1; i <= extra; i++)
                    r[i] = (byte)(total >> (4 + 8 * (i - 1)));
                return r;
            }
        }
        throw new ArgumentOutOfRangeException(nameof(bodyLength), $"An AML object of {bodyLength} bytes exceeds the 28-bit PkgLength.");
    }

    /// <summary>
    /// The 32-bit compressed EISA id (ACPI 6.5 §19.6.35 EISAID): three uppercase letters as 5-bit
    /// values (letter − 0x40) and four hex digits, stored big-endian in the integer's bytes.
    /// </summary>
    /// <exception cref="ArgumentException">The id is not three letters A–Z followed by four hex digits.</exception>
    public static uint EncodeEisaId(string id)
    {
        ArgumentNullException.ThrowIfNull(id);
        if (id.Length != 7 || !IsUpper(id[0]) || !IsUpper(id[1]) || !IsUpper(id[2]) || id.AsSpan(3).ContainsAnyExcept(UpperHexDigits))
            throw new ArgumentException($"\"{id}\" is not an EISA id (three letters A-Z and four uppercase hex digits).", nameof(id));
        uint v = ((uint)(id[0] - 0x40) << 26) | ((uint)(id[1] - 0x40) << 21) | ((uint)(id[2] - 0x40) << 16)
            | uint.Parse(id.AsSpan(3), System.Globalization.NumberStyles.HexNumber, System.Globalization.CultureInfo.InvariantCulture);
        return System.Buffers.Binary.BinaryPrimitives.ReverseEndianness(v);
    }

    /// <summary>
    /// A NameString (§20.2.2): optional root (<c>\</c>) or parent (<c>^</c>) prefixes, then
    /// dot-separated segments of 1–4 characters ([A-Z_] then [A-Z0-9_]), each padded with '_'.
    /// </summary>
    /// <exception cref="ArgumentException">A segment is empty, too long or has another character.</exception>
    public static byte[] EncodeNameString(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        var r = new List<byte>();
        int i = 0;
        if (path.StartsWith('\\'))
        {
            r.Add(RootChar);
            i = 1;
        }
        else
        {
            while (i < path.Length && path[i] == '^')
            {
                r.Add(ParentPrefixChar);
                i++;
            }
        }
        string rest = path[i..];
        string[] segs = rest.Length == 0 ? [] : rest.Split('.');
        if (segs.Length > 255)
            throw new ArgumentException($"Name path \"{path}\" has more than 255 segments.", nameof(path));
        if (segs.Length == 0)
            r.Add(ZeroOp); // NullName
        else if (segs.Length == 2)
            r.Add(DualNamePrefix);
        else if (segs.Length > 2)
        {
            r.Add(MultiNamePrefix);
            r.Add((byte)segs.Length);
        }
        foreach (string s in segs)
        {
            if (s.Length is < 1 or > 4 || !(IsUpper(s[0]) || s[0] == '_'))
                throw new ArgumentException($"\"{s}\" in \"{path}\" is not an ACPI name segment.", nameof(path));
            foreach (char c in s)
            {
                if (!(IsUpper(c) || c == '_' || char.IsAsciiDigit(c)))
                    throw new ArgumentException($"\"{s}\" in \"{path}\" is not an ACPI name segment.", nameof(path));
                r.Add((byte)c);
            }
            for (int k = s.Length; k < 4; k++)
                r.Add((byte)'_');
        }
        return r.ToArray();
    }

    private static bool IsUpper(char c) => c is >= 'A' and <= 'Z';

    private void WriteNameString(string path) => _aml.AddRange(EncodeNameString(path));

    private void Open(Kind kind) => _open.Push(new Frame(kind, _aml.Count, 0));

    private void CountElement()
    {
        if (_open.Count > 0 && _open.Peek().Kind == Kind.Package)
        {
            var f = _open.Pop();
            _open.Push(f with { Elements = f.Elements + 1 });
        }
    }

    private void AddLe(ulong v, int bytes)
    {
        for (int i = 0; i < bytes; i++)
            _aml.Add((byte)(v >> (8 * i)));
    }
}
