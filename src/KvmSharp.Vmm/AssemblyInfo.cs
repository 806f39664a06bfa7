using System.Runtime.CompilerServices;

[assembly: InternalsVisibleTo("KvmSharp.IntegrationTests")]
[assembly: InternalsVisibleTo("KvmSharp.Vmm.Tests")]
