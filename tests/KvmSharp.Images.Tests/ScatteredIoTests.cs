using System.Runtime.InteropServices;
using KvmSharp.Images.Qcow2;
using KvmSharp.Interop;

namespace KvmSharp.Images.Tests;

/// <summary>
/// ReadScattered/WriteGathered (preadv/pwritev on raw images, a loop elsewhere) move exactly the
/// bytes that one Read/Write per buffer would: a virtio-blk request's pages in order, including
/// empty buffers and more buffers than fit the stack copy.
/// </summary>
public sealed unsafe class ScatteredIoTests : IDisposable
{
    private const int DiskSize = 16 << 20;
    private readonly TempDir _dir = new();
    private readonly List<nint> _native = [];

    public void Dispose()
    {
        foreach (nint p in _native)
            NativeMemory.Free((void*)p);
        _dir.Dispose();
    }

    /// <summary><paramref name="count"/> native buffers of 0 to 9000 bytes.</summary>
    private NativeBuffer[] Buffers(int count, Random rnd)
    {
        var buffers = new NativeBuffer[count];
        for (int i = 0; i < count; i++)
        {
            int length = rnd.Next(8) == 0 ? 0 : rnd.Next(1, 9000);
            nint p = (nint)NativeMemory.Alloc((nuint)Math.Max(length, 1));
            _native.Add(p);
            buffers[i] = new NativeBuffer(new Span<byte>((void*)p, length));
        }
        return buffers;
    }

    private IBlockDevice Open(string format)
    {
        byte[] content = Pattern.Make(DiskSize, seed: 7);
        string raw = _dir["disk.raw"];
        File.WriteAllBytes(raw, content);
        if (format == "raw")
            return RawImage.Open(raw, readOnly: false);
        Qcow2Creator.Create(_dir["disk.qcow2"], new Qcow2CreateOptions { Size = DiskSize, ClusterSize = 65536, BackingFile = "disk.raw", BackingFormat = "raw" });
        return BlockDeviceFactory.Open(_dir["disk.qcow2"], readOnly: false);
    }

    [Theory]
    [InlineData("raw", 5)]
    [InlineData("raw", 300)]   // about a 1 MiB virtio-blk request
    [InlineData("raw", 1500)]  // beyond IOV_MAX: two system calls
    [InlineData("qcow2", 300)] // the interface's default loop
    public void ScatteredReadAndGatheredWriteMatchPlainIo(string format, int count)
    {
        using var dev = Open(format);
        var rnd = new Random(count);
        NativeBuffer[] buffers = Buffers(count, rnd);
        int total = buffers.Sum(b => b.Length);
        ulong offset = (ulong)rnd.Next(0, DiskSize - total);

        dev.ReadScattered(buffers, offset);
        var expected = new byte[total];
        dev.Read(expected, offset);
        Assert.Equal(expected, buffers.SelectMany(b => b.Span.ToArray()).ToArray());

        foreach (NativeBuffer b in buffers)
            rnd.NextBytes(b.Span);
        dev.WriteGathered(buffers, offset);
        var back = new byte[total];
        dev.Read(back, offset);
        Assert.Equal(buffers.SelectMany(b => b.Span.ToArray()).ToArray(), back);
    }

    [Fact]
    public void ScatteredIoOutsideTheDiskIsRefusedWithoutTouchingIt()
    {
        using var dev = Open("raw");
        NativeBuffer[] buffers = Buffers(4, new Random(1));
        ulong total = (ulong)buffers.Sum(b => b.Length);
        byte[] before = File.ReadAllBytes(_dir["disk.raw"]);
        var e = Assert.Throws<ImageException>(() => dev.WriteGathered(buffers, DiskSize - total + 1));
        Assert.Equal(ImageErrorKind.OutOfBounds, e.Kind);
        Assert.Throws<ImageException>(() => dev.ReadScattered(buffers, ulong.MaxValue - 2));
        Assert.Equal(before, File.ReadAllBytes(_dir["disk.raw"]));
    }

    /// <summary>A file that shrinks under an open image: preadv comes back short, then with 0; the
    /// bytes that exist arrive in the right buffers and the rest reads as zeros, as Read does.</summary>
    [Fact]
    public void ScatteredReadAcrossTheEndOfAShrunkFileGivesTheRestAsZeros()
    {
        using var dev = Open("raw");
        NativeBuffer[] buffers = Buffers(40, new Random(3));
        int total = buffers.Sum(b => b.Length);
        foreach (NativeBuffer b in buffers)
            b.Span.Fill(0xAA);
        ulong offset = (ulong)(DiskSize - total);
        int kept = total / 3;
        byte[] expected = new byte[total];
        File.ReadAllBytes(_dir["disk.raw"]).AsSpan((int)offset, kept).CopyTo(expected);
        using (var f = new FileStream(_dir["disk.raw"], FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
            f.SetLength((long)offset + kept);
        dev.ReadScattered(buffers, offset);
        Assert.Equal(expected, buffers.SelectMany(b => b.Span.ToArray()).ToArray());
    }

    [Fact]
    public void GatheredWriteToAReadOnlyRawImageIsRefused()
    {
        File.WriteAllBytes(_dir["ro.raw"], new byte[DiskSize]);
        using var dev = RawImage.Open(_dir["ro.raw"], readOnly: true);
        var e = Assert.Throws<ImageException>(() => dev.WriteGathered(Buffers(3, new Random(2)), 0));
        Assert.Equal(ImageErrorKind.ReadOnly, e.Kind);
    }
}
