//! The `horde` binary: everything is in [`horde_node::cli`].

fn main() -> std::process::ExitCode {
    horde_node::cli::main()
}
