namespace KvmSharp.Memory;

/// <summary>How guest RAM is backed.</summary>
public sealed record GuestMemoryOptions
{
    /// <summary>Mark RAM <c>MADV_MERGEABLE</c> so KSM can share identical pages between VMs.</summary>
    public bool Mergeable { get; init; }

    /// <summary>Back RAM with hugetlbfs pages (<c>MAP_HUGETLB</c>); fails when none are reserved.</summary>
    public bool HugePages { get; init; }

    /// <summary>Ask for transparent huge pages (<c>MADV_HUGEPAGE</c>).</summary>
    public bool TransparentHugePages { get; init; }

    /// <summary>
    /// Populate all of RAM up front (<c>MADV_POPULATE_WRITE</c>, Linux 5.14; QEMU's -mem-prealloc,
    /// Cloud Hypervisor's prefault=on): no host page faults while the guest runs, and the host
    /// commits the memory now rather than at an awkward moment later.
    /// </summary>
    public bool Prefault { get; init; }
}
