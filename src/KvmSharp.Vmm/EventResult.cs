namespace KvmSharp.Vmm;

/// <summary>What an <see cref="IEventHandler"/> asks of the loop after a call.</summary>
public enum EventResult
{
    /// <summary>Nothing left: call again on the next event of the source.</summary>
    Done,

    /// <summary>A budget ran out with work left that no new event will announce (an
    /// edge-triggered fd): call again after the other ready events, so one busy source cannot
    /// starve the rest.</summary>
    MoreWork,

    /// <summary>Work is left but a consumer is full and gives no event when it has room again
    /// (a UART's input buffer): call again after <see cref="EventLoop.RetryDelayMilliseconds"/>.</summary>
    Later,
}
