using System.Reflection;
using System.Runtime.CompilerServices;
using KvmSharp.Interop;
using Xunit;

namespace KvmSharp.Architecture.Tests;

/// <summary>
/// The raw, variadic <c>ioctl</c> and the request-code encoders stay inside Interop, visible only to
/// KvmSharp.Kvm, which wraps each KVM ioctl in one typed method (style.md §3). Public, they would let any
/// assembly that references Interop (Devices does, through Memory and Images) issue KVM ioctls on a file
/// descriptor and get round the layer table.
/// </summary>
public class IoctlVisibilityTests
{
    private static readonly string[] RawNames = ["ioctl", "IO", "IOR", "IOW", "IOWR"];

    [Fact]
    public void RawIoctlIsNotPublic()
    {
        var exposed = typeof(Libc).Assembly.GetExportedTypes()
            .SelectMany(t => t.GetMethods(BindingFlags.Public | BindingFlags.Static | BindingFlags.Instance | BindingFlags.DeclaredOnly))
            .Where(m => RawNames.Contains(m.Name))
            .Select(m => $"{m.DeclaringType}.{m.Name}")
            .ToList();
        Assert.Empty(exposed);
    }

    [Fact]
    public void InteropInternalsAreVisibleOnlyToKvm()
    {
        var friends = typeof(Libc).Assembly.GetCustomAttributes<InternalsVisibleToAttribute>().Select(a => a.AssemblyName).ToList();
        Assert.Equal([LayerRules.Kvm], friends);
    }
}
