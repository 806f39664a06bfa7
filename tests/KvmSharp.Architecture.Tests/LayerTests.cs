using System.Reflection;
using System.Xml.Linq;
using Xunit;

namespace KvmSharp.Architecture.Tests;

/// <summary>Checks the compiled assemblies' references against <see cref="LayerRules.Table"/>
/// (design.md "Layers"): what the compiler really emitted, not what the project files say.</summary>
public class LayerTests
{
    public static TheoryData<string> Assemblies() => new(LayerRules.Table.Select(r => r.Assembly));

    [Theory]
    [MemberData(nameof(Assemblies))]
    public void ReachesNoForbiddenAssembly(string assembly)
    {
        var rule = LayerRules.Table.Single(r => r.Assembly == assembly);
        var paths = ReachableKvmSharpAssemblies(assembly);
        var broken = rule.MustNotReference.Where(paths.ContainsKey).Select(f => string.Join(" → ", paths[f])).ToList();
        Assert.True(broken.Count == 0,
            $"forbidden reference: {string.Join("; ", broken)} ({rule.Why}; design.md \"Layers\").");
    }

    [Theory]
    [MemberData(nameof(Assemblies))]
    public void ReachesSomeAssembliesOnlyThroughAnother(string assembly)
    {
        var rule = LayerRules.Table.Single(r => r.Assembly == assembly);
        var direct = Load(assembly).GetReferencedAssemblies().Select(a => a.Name!).ToHashSet();
        var broken = (rule.MustNotReferenceDirectly ?? []).Where(direct.Contains).ToList();
        Assert.True(broken.Count == 0, $"{assembly} references {string.Join(", ", broken)} directly ({rule.Why}).");
    }

    [Fact]
    public void EverySrcProjectHasARow()
    {
        var names = SrcAssemblyNames();
        var rows = LayerRules.Table.Select(r => r.Assembly).ToHashSet();
        Assert.Empty(names.Except(rows)); // a new project: add a row to LayerRules.Table and to README.md
        Assert.Empty(rows.Except(names)); // a row for a project that is gone
    }

    [Fact]
    public void EverySrcProjectIsReferencedByThisProject()
    {
        // Otherwise its assembly is not next to this one and the rules above cannot read it.
        foreach (string name in SrcAssemblyNames())
            Assert.True(File.Exists(Path.Combine(AppContext.BaseDirectory, name + ".dll")), $"add a ProjectReference to {name}'s project");
    }

    /// <summary>Every KvmSharp assembly reachable from <paramref name="root"/>, each with the shortest
    /// reference path that reaches it (for the failure message).</summary>
    internal static Dictionary<string, List<string>> ReachableKvmSharpAssemblies(string root)
    {
        var paths = new Dictionary<string, List<string>>(StringComparer.Ordinal);
        var queue = new Queue<List<string>>();
        queue.Enqueue([root]);
        while (queue.TryDequeue(out var path))
        {
            foreach (var reference in Load(path[^1]).GetReferencedAssemblies())
            {
                string name = reference.Name!;
                if (!IsOurs(name) || name == root || paths.ContainsKey(name))
                    continue;
                List<string> next = [.. path, name];
                paths[name] = next;
                queue.Enqueue(next);
            }
        }
        return paths;
    }

    private static bool IsOurs(string name) => name.StartsWith("KvmSharp.", StringComparison.Ordinal) || name == LayerRules.Cli;

    private static Assembly Load(string name) => Assembly.Load(new AssemblyName(name));

    /// <summary>The assembly name of every project under src/ (AssemblyName, or the project's file name).</summary>
    internal static HashSet<string> SrcAssemblyNames()
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (string csproj in Directory.EnumerateFiles(Path.Combine(RepoRoot(), "src"), "*.csproj", SearchOption.AllDirectories))
        {
            string? explicitName = XDocument.Load(csproj).Descendants("AssemblyName").FirstOrDefault()?.Value;
            names.Add(explicitName ?? Path.GetFileNameWithoutExtension(csproj));
        }
        return names;
    }

    internal static string RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "KvmSharp.slnx")))
                return dir.FullName;
        }
        throw new InvalidOperationException($"no KvmSharp.slnx above {AppContext.BaseDirectory}");
    }
}
