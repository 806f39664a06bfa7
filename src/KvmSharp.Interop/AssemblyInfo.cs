using System.Runtime.CompilerServices;

// Every P/Invoke here is blittable; nothing relies on runtime marshalling (style.md §3).
[assembly: DisableRuntimeMarshalling]

// The raw ioctl and its request encoders (Libc.Ioctl.cs) are for the typed KVM wrappers only.
[assembly: InternalsVisibleTo("KvmSharp.Kvm")]
