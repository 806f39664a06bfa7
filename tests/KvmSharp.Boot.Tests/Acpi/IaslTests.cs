using System.Diagnostics;
using KvmSharp.Boot.Acpi;
using Xunit;

namespace KvmSharp.Boot.Tests.Acpi;

/// <summary>
/// Checks the tables with ACPICA's own tools (Debian package acpica-tools): each table written to
/// guest memory is dumped to a file and disassembled with <c>iasl -d</c>, which verifies
/// checksums, lengths and the AML grammar. Skipped when iasl is not installed.
/// </summary>
public sealed class IaslTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("kvmsharp-acpi-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static string? FindIasl()
    {
        foreach (string d in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':'))
        {
            if (d.Length > 0 && File.Exists(Path.Combine(d, "iasl")))
                return Path.Combine(d, "iasl");
        }
        return null;
    }

    private static (int Code, string Output) Run(string iasl, string dir, params string[] args)
    {
        var psi = new ProcessStartInfo(iasl) { WorkingDirectory = dir, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        string stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, stdout + stderr.Result);
    }

    /// <summary>Writes the tables into guest memory, reads each one back into a file, disassembles it.</summary>
    private Dictionary<string, string> Disassemble(AcpiConfig config)
    {
        string iasl = FindIasl() ?? throw new InvalidOperationException("unreachable");
        using var m = Mem.Create(config.RamBytes > 256 * Mem.MiB ? 256 * Mem.MiB : config.RamBytes);
        ulong rsdpAddr = AcpiTables.Write(m, config);
        var set = AcpiTables.Build(config);
        var result = new Dictionary<string, string>();
        foreach (var t in set.Tables)
        {
            if (t.Signature == "RSDP")
                continue; // this iasl (20200925) does not take an RSDP file; AcpiTablesTests checks it
            // Read back from guest memory: what the guest sees is what gets checked.
            byte[] bytes = Mem.Read(m, t.Address, t.Length);
            string name = t.Signature.ToLowerInvariant();
            string file = Path.Combine(_dir, name + ".dat");
            File.WriteAllBytes(file, bytes);
            var (code, output) = Run(iasl, _dir, "-d", file);
            Assert.True(code == 0, $"iasl -d {t.Signature} exited with {code}:\n{output}");
            Assert.DoesNotContain("Error", output, StringComparison.Ordinal);
            Assert.DoesNotContain("Invalid", output, StringComparison.Ordinal);
            string dsl = File.ReadAllText(Path.Combine(_dir, name + ".dsl"));
            Assert.DoesNotContain("Incorrect checksum", dsl, StringComparison.OrdinalIgnoreCase);
            Assert.DoesNotContain("**** ", dsl, StringComparison.Ordinal); // iasl marks problems with ****
            result[t.Signature] = dsl;
        }
        Assert.Equal(PlatformLayout.RsdpAddress, rsdpAddr);
        return result;
    }

    [Theory]
    [InlineData(1, 512UL << 20)]
    [InlineData(2, 1UL << 30)]
    [InlineData(64, 8UL << 30)]
    public void Tables_disassemble_cleanly_with_the_expected_contents(int cpus, ulong ram)
    {
        if (FindIasl() is null)
            Assert.Skip("iasl is not installed (apt-get install acpica-tools).");
        var dsl = Disassemble(new AcpiConfig(cpus, ram));

        Assert.Contains("\"FACS\"", dsl["FACS"]);

        Assert.Contains("\"FACP\"", dsl["FACP"]);
        Assert.Contains("Reset Register Supported (V2) : 1", dsl["FACP"]);
        Assert.Contains("Hardware Reduced (V5) : 0", dsl["FACP"]);
        Assert.Contains("8042 Present on ports 60/64 (V2) : 1", dsl["FACP"]);
        Assert.Contains("0000000000000600", dsl["FACP"]);   // X_PM1a_EVT_BLK
        Assert.Contains("0000000000000604", dsl["FACP"]);   // X_PM1a_CNT_BLK
        Assert.Contains("0000000000000CF9", dsl["FACP"]);   // RESET_REG

        int lapics = CountOccurrences(dsl["APIC"], "Processor Local APIC");
        Assert.Equal(cpus, lapics);
        Assert.Contains("FEC00000", dsl["APIC"]);
        Assert.Contains("Interrupt Source Override", dsl["APIC"]);
        Assert.Contains("Local APIC NMI", dsl["APIC"]);

        Assert.Contains("00000000E0000000", dsl["MCFG"]);

        string dsdt = dsl["DSDT"];
        Assert.Contains("Name (_S5, Package", dsdt);
        Assert.Contains("Device (PCI0)", dsdt);
        Assert.Contains("EisaId (\"PNP0A08\")", dsdt);
        Assert.Contains("EisaId (\"PNP0A03\")", dsdt);
        Assert.Contains("EisaId (\"PNP0C02\")", dsdt);
        Assert.Contains("EisaId (\"PNP0501\")", dsdt);
        Assert.Contains("EisaId (\"PNP0303\")", dsdt);
        Assert.Contains("EisaId (\"PNP0B00\")", dsdt);
        Assert.Contains("Name (_PRT, Package", dsdt);
        Assert.Contains("WordBusNumber", dsdt);
        Assert.Contains("WordIO", dsdt);
        Assert.Contains("DWordMemory", dsdt);
        Assert.Contains("QWordMemory", dsdt);
        Assert.Contains("Memory32Fixed", dsdt);
        Assert.Contains("0xC0000000", dsdt);
        Assert.Contains("0xDFFFFFFF", dsdt);
        ulong w64 = PlatformLayout.Pci64WindowStart(ram);
        Assert.Contains($"0x{w64:X16}", dsdt);
        Assert.Contains($"Device ({AcpiTables.ProcessorName(cpus - 1)})", dsdt);
        Assert.Equal(cpus, CountOccurrences(dsdt, "\"ACPI0007\""));
    }

    [Fact]
    public void Dsdt_recompiles_to_the_same_aml()
    {
        string? iasl = FindIasl();
        if (iasl is null)
            Assert.Skip("iasl is not installed (apt-get install acpica-tools).");
        var set = AcpiTables.Build(new AcpiConfig(4, 6UL << 30));
        byte[] dsdt = set.Get("DSDT").ToArray();
        File.WriteAllBytes(Path.Combine(_dir, "dsdt.dat"), dsdt);
        var (code, output) = Run(iasl, _dir, "-d", "dsdt.dat");
        Assert.True(code == 0, output);
        // Compile the disassembly back: iasl's AML must equal ours (apart from the header's
        // creator fields and checksum, which iasl fills with its own).
        (code, output) = Run(iasl, _dir, "-p", "recompiled", "dsdt.dsl");
        Assert.True(code == 0, output);
        byte[] again = File.ReadAllBytes(Path.Combine(_dir, "recompiled.aml"));
        Assert.Equal(dsdt.AsSpan(36).ToArray(), again.AsSpan(36).ToArray());
    }

    [Fact]
    public void Builder_constructs_disassemble_as_written()
    {
        string? iasl = FindIasl();
        if (iasl is null)
            Assert.Skip("iasl is not installed (apt-get install acpica-tools).");
        var a = new AmlBuilder();
        a.BeginScope("\\_SB");
        a.BeginDevice("GED0");
        a.Name("_HID").String("ACPI0013");
        a.Name("_UID").Integer(0);
        a.Name("_CRS").Buffer(new ResourceTemplate()
            .Interrupt(levelTriggered: false, activeLow: false, shared: false, 5)
            .Interrupt(levelTriggered: true, activeLow: true, shared: true, 16, 17)
            .Io(0x3F8, 0x3F8, 1, 8)
            .IrqNoFlags(3, 4)
            .ToArray());
        a.Name("BIG").Integer(0x1_2345_6789);
        a.Name("WRD").Integer(0x1234);
        a.Name("NEST").BeginPackage().BeginPackage().Integer(1).End().String("x").NameReference("\\_SB.GED0").End();
        a.BeginMethod("_STA");
        a.Return().Integer(0x0F);
        a.End();
        a.BeginMethod("MTH2", argCount: 2, serialized: true);
        a.Return().Integer(0);
        a.End();
        a.End();
        a.End();
        byte[] aml = a.ToArray();
        byte[] t = new byte[36 + aml.Length];
        "SSDT"u8.CopyTo(t);
        BitConverter.GetBytes(t.Length).CopyTo(t, 4);
        t[8] = 2;
        "KVMSHPTESTTEST"u8.CopyTo(t.AsSpan(10));
        aml.CopyTo(t, 36);
        t[9] = AcpiTables.Checksum(t);
        File.WriteAllBytes(Path.Combine(_dir, "ssdt.dat"), t);
        var (code, output) = Run(iasl, _dir, "-d", "ssdt.dat");
        Assert.True(code == 0, output);
        string dsl = File.ReadAllText(Path.Combine(_dir, "ssdt.dsl"));
        Assert.Contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )", dsl);
        Assert.Contains("Interrupt (ResourceConsumer, Level, ActiveLow, Shared, ,, )", dsl);
        Assert.Contains("IRQNoFlags ()", dsl);
        Assert.Contains("{3,4}", dsl);
        Assert.Contains("Name (BIG, 0x0000000123456789)", dsl);
        Assert.Contains("Name (WRD, 0x1234)", dsl);
        Assert.Contains("Method (_STA, 0, NotSerialized)", dsl);
        Assert.Contains("Method (MTH2, 2, Serialized)", dsl);
        Assert.Contains("Return (0x0F)", dsl);
        Assert.Contains("\\_SB.GED0", dsl);
    }

    private static int CountOccurrences(string s, string what)
    {
        int n = 0;
        for (int i = s.IndexOf(what, StringComparison.Ordinal); i >= 0; i = s.IndexOf(what, i + what.Length, StringComparison.Ordinal))
            n++;
        return n;
    }
}
