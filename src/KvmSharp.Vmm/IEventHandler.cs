namespace KvmSharp.Vmm;

/// <summary>What the I/O thread calls when a source registered with <see cref="EventLoop"/> is ready.</summary>
/// <remarks>One handler object per source, so the handler knows its fd: the loop passes only
/// the epoll mask. Handlers run on the I/O thread only and must not block.</remarks>
public interface IEventHandler
{
    /// <summary>Serves the source.</summary>
    /// <param name="events">The epoll mask; 0 when the loop calls again because the last call
    /// returned <see cref="EventResult.MoreWork"/> or <see cref="EventResult.Later"/>.</param>
    /// <returns>Whether and when to call again without a new event.</returns>
    EventResult Process(uint events);
}
