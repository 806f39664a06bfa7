using Xunit;

// Real boots are CPU-bound on a 2-core machine: run them one at a time so each keeps a core and
// its timeouts mean something.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
