using System.Runtime.CompilerServices;

// Every P/Invoke here is blittable; nothing relies on runtime marshalling (style.md §3).
[assembly: DisableRuntimeMarshalling]
