using KvmSharp.Interop;
using KvmSharp.Kvm.Native;
using static KvmSharp.Kvm.Native.KvmIoctls;

namespace KvmSharp.Kvm;

/// <summary>The <c>/dev/kvm</c> system handle (api.rst §4: "system ioctls").</summary>
public sealed unsafe class KvmSystem : IDisposable
{
    public const string DevicePath = "/dev/kvm";
    private readonly FileDescriptor _fd;

    private KvmSystem(FileDescriptor fd) => _fd = fd;

    /// <summary>Opens /dev/kvm and checks the API version is 12.</summary>
    /// <exception cref="NativeException">/dev/kvm cannot be opened.</exception>
    /// <exception cref="KvmException">The API version is not 12.</exception>
    public static KvmSystem Open(string path = DevicePath)
    {
        var fd = Libc.Open(path, Libc.O_RDWR);
        var kvm = new KvmSystem(fd);
        int version = kvm.GetApiVersion();
        if (version != KvmConstants.KVM_API_VERSION)
        {
            kvm.Dispose();
            throw new KvmException($"{path} speaks KVM API version {version}; KvmSharp needs {KvmConstants.KVM_API_VERSION}.");
        }
        return kvm;
    }

    /// <summary>True when /dev/kvm exists and can be opened read-write by this process.</summary>
    public static bool IsAvailable(out string reason)
    {
        if (!File.Exists(DevicePath))
        {
            reason = $"{DevicePath} does not exist (no KVM on this host)";
            return false;
        }
        try
        {
            using var k = Open();
            reason = "";
            return true;
        }
        catch (NativeException e)
        {
            reason = e.Message;
            return false;
        }
    }

    /// <summary>
    /// True when KVM comes from the <c>kvm_pvm</c> module (a PVM host: guest ring 0 is emulated by
    /// the host; see docs/pvm.md).
    /// </summary>
    public static bool IsPvmHost => Directory.Exists("/sys/module/kvm_pvm");

    public int GetApiVersion() => Libc.ioctl(_fd.Fd, KVM_GET_API_VERSION, 0);

    /// <summary>KVM_CHECK_EXTENSION: 0 when unsupported, otherwise a capability-specific positive value.</summary>
    public int CheckExtension(int capability)
    {
        int r = Libc.ioctl(_fd.Fd, KVM_CHECK_EXTENSION, capability);
        return r < 0 ? 0 : r;
    }

    /// <exception cref="KvmException">The ioctl failed.</exception>
    public int GetVcpuMmapSize()
    {
        int r = Libc.ioctl(_fd.Fd, KVM_GET_VCPU_MMAP_SIZE, 0);
        if (r < 0)
            KvmException.Throw("KVM_GET_VCPU_MMAP_SIZE");
        return r;
    }

    /// <summary>KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can present to a guest.</summary>
    /// <exception cref="KvmException">The ioctl failed.</exception>
    public kvm_cpuid_entry2[] GetSupportedCpuid()
    {
        const int Max = 256;
        int size = 8 + Max * sizeof(kvm_cpuid_entry2);
        // SAFETY: buf has room for the header and Max entries and nent says Max, so KVM writes at most
        // Max entries (E2BIG otherwise) and sets nent to the count it wrote, which bounds the copy below.
        byte* buf = stackalloc byte[size];
        new Span<byte>(buf, size).Clear();
        *(uint*)buf = Max;
        if (Libc.ioctl(_fd.Fd, KVM_GET_SUPPORTED_CPUID, buf) < 0)
            KvmException.Throw("KVM_GET_SUPPORTED_CPUID");
        int n = (int)*(uint*)buf;
        return new ReadOnlySpan<kvm_cpuid_entry2>(buf + 8, n).ToArray();
    }

    /// <summary>KVM_CREATE_VM with the default machine type.</summary>
    /// <exception cref="KvmException">The ioctl failed.</exception>
    public KvmVm CreateVm()
    {
        int fd = Libc.ioctl(_fd.Fd, KVM_CREATE_VM, 0);
        if (fd < 0)
            KvmException.Throw("KVM_CREATE_VM");
        return new KvmVm(new FileDescriptor(fd), GetVcpuMmapSize());
    }

    public void Dispose() => _fd.Dispose();
}
