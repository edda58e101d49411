//! The `horde` binary: everything is in [`horde_node::cli`].

/// jemalloc instead of glibc's malloc: it gives freed memory back to the system. A facilitator
/// that 255 nodes join through at once holds ~100 KB per open connection (QUIC and gossipsub
/// state, send queues) for the seconds of the joins; the connections close, but glibc kept the
/// freed pages in the discovery thread's arena (40 MiB of a 52 MiB facilitator, never trimmed;
/// `malloc_trim` would need unsafe code). jemalloc purges dirty pages that stay unused for its
/// default 10 s (`dirty_decay_ms`, driven by the allocations of the running node).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    horde_node::cli::main()
}
