using System.Buffers.Binary;
using KvmSharp.Devices.Pci;
using Xunit;

namespace KvmSharp.Devices.Tests.Pci;

/// <summary>MSI-X vectors bound to their own routes (<see cref="IMsiVector"/>), PCI LB 3.0 §6.8.2.</summary>
public class MsixTableTests
{
    private sealed class Vector : IMsiVector
    {
        public readonly List<(ulong Address, uint Data)> Programs = [];
        public int Triggers;
        public void Program(ulong address, uint data) => Programs.Add((address, data));
        public void Trigger() => Interlocked.Increment(ref Triggers);
    }

    private sealed class VectorSink(bool withVectors) : IMsiSink
    {
        public readonly List<Vector> Vectors = [];
        public readonly List<(ulong, uint)> Delivered = [];
        public void Deliver(ulong address, uint data) => Delivered.Add((address, data));

        public IMsiVector? CreateVector()
        {
            if (!withVectors)
                return null;
            var v = new Vector();
            Vectors.Add(v);
            return v;
        }
    }

    private const ushort Enable = 0x8000, FunctionMask = 0x4000;

    private static void Write32(MsixTable t, int vector, int field, uint value)
    {
        var b = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        t.Write((ulong)(vector * MsixTable.EntrySize + field), b);
    }

    private static ulong Pba(MsixTable t)
    {
        var b = new byte[8];
        t.Read(MsixTable.PbaOffset, b);
        return BinaryPrimitives.ReadUInt64LittleEndian(b);
    }

    /// <summary>Linux's order: message while masked, then unmask (msi.c: __pci_write_msi_msg, pci_msix_unmask).</summary>
    private static void ProgramAndUnmask(MsixTable t, int vector, uint address, uint data)
    {
        Write32(t, vector, 0, address);
        Write32(t, vector, 4, 0);
        Write32(t, vector, 8, data);
        Write32(t, vector, 12, 0);
    }

    [Fact]
    public void EachEntryGetsAVectorProgrammedOnlyWhenUnmaskedAndEnabled()
    {
        var sink = new VectorSink(true);
        var t = new MsixTable(2, sink);
        Assert.Equal(2, sink.Vectors.Count);
        ProgramAndUnmask(t, 0, 0xFEE0_0000, 0x41);
        Assert.Empty(sink.Vectors[0].Programs); // MSI-X still disabled
        t.SetControl(Enable);
        Assert.Equal((0xFEE0_0000UL, 0x41u), Assert.Single(sink.Vectors[0].Programs));
        Assert.Empty(sink.Vectors[1].Programs);      // still masked

        Assert.True(t.Trigger(0));
        Assert.Equal(1, sink.Vectors[0].Triggers);
        Assert.Empty(sink.Delivered);
    }

    [Fact]
    public void AMaskedVectorSetsItsPendingBitAndFiresOnUnmask()
    {
        var sink = new VectorSink(true);
        var t = new MsixTable(2, sink);
        t.SetControl(Enable);
        Write32(t, 1, 0, 0xFEE0_0000);
        Write32(t, 1, 8, 0x42);
        Assert.True(t.Trigger(1));
        Assert.Equal(0b10UL, Pba(t));
        Assert.Equal(0, sink.Vectors[1].Triggers);
        Write32(t, 1, 12, 0); // unmask
        Assert.Equal(0UL, Pba(t));
        Assert.Equal(1, sink.Vectors[1].Triggers);
        Assert.Equal((0xFEE0_0000UL, 0x42u), Assert.Single(sink.Vectors[1].Programs));
    }

    [Fact]
    public void FunctionMaskHoldsEveryVectorAndMaskingAgainStopsTheFastPath()
    {
        var sink = new VectorSink(true);
        var t = new MsixTable(1, sink);
        ProgramAndUnmask(t, 0, 0xFEE0_0000, 0x41);
        t.SetControl(Enable | FunctionMask);
        t.Trigger(0);
        Assert.Equal(0, sink.Vectors[0].Triggers);
        Assert.Equal(1UL, Pba(t));
        t.SetControl(Enable);
        Assert.Equal(1, sink.Vectors[0].Triggers);
        Write32(t, 0, 12, 1); // mask the vector
        t.Trigger(0);
        Assert.Equal(1, sink.Vectors[0].Triggers);
        Assert.Equal(1UL, Pba(t));
    }

    [Fact]
    public void ReprogrammingAnUnmaskedVectorReprogramsItsRouteOnce()
    {
        var sink = new VectorSink(true);
        var t = new MsixTable(1, sink);
        t.SetControl(Enable);
        ProgramAndUnmask(t, 0, 0xFEE0_0000, 0x41);
        Write32(t, 0, 8, 0x51);            // data changed while unmasked
        Write32(t, 0, 12, 0);              // the same control again: no new program
        Assert.Equal([(0xFEE0_0000UL, 0x41u), (0xFEE0_0000UL, 0x51u)], sink.Vectors[0].Programs);
    }

    [Fact]
    public void DisabledMsixReturnsFalseAndWithoutVectorsTheSinkDelivers()
    {
        var sink = new VectorSink(false);
        var t = new MsixTable(1, sink);
        Assert.False(t.Trigger(0));
        ProgramAndUnmask(t, 0, 0xFEE0_0000, 0x41);
        t.SetControl(Enable);
        Assert.True(t.Trigger(0));
        Assert.True(t.Trigger(5)); // out of range: ignored
        Assert.Equal((0xFEE0_0000UL, 0x41u), Assert.Single(sink.Delivered));
    }
}
