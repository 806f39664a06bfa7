using Xunit;

namespace KvmSharp.Vmm.Tests;

public class PanicDetectorTests
{
    private static bool Feed(string console)
    {
        var d = new PanicDetector();
        foreach (byte b in System.Text.Encoding.ASCII.GetBytes(console))
            d.Feed(b);
        return d.Seen;
    }

    [Fact]
    public void SeesLinuxPanicBannerInTheMiddleOfALine() =>
        Assert.True(Feed("[    1.23] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n"));

    [Theory]
    [InlineData("Kernel panic - not syncin")]
    [InlineData("KKernel panic - not syncing")] // a false start restarts the match
    [InlineData("kernel panic - not syncing")]
    [InlineData("")]
    public void MatchesOnlyTheWholeBanner(string console) =>
        Assert.Equal(console.StartsWith("KK", StringComparison.Ordinal), Feed(console));
}
