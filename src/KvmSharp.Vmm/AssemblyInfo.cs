using System.Runtime.CompilerServices;

[assembly: InternalsVisibleTo("KvmSharp.IntegrationTests")]
