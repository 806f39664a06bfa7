namespace KvmSharp.Vmm;

/// <summary>
/// A <see cref="VmConfig"/> setting that cannot work, from <see cref="VmConfig.CheckValues"/>.
/// <see cref="Setting"/> is the <see cref="VmConfig"/> property's name (<c>nameof(VmConfig.CpuCount)</c>)
/// and <see cref="Problem"/> a clause without it ("must be from 1 to 64, not 65"), so each front end
/// can say which of its own inputs is wrong: a command-line flag, a config file's JSON path, an API field.
/// </summary>
public sealed record VmConfigProblem(string Setting, string Problem)
{
    /// <summary>"Setting: problem", for a front end with no words of its own for the setting.</summary>
    public override string ToString() => $"{Setting}: {Problem}";
}
