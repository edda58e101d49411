//! horde-testnet: starts a local network of `horde node` processes with role flags, and is the
//! library multi-node tests use. The network harness and the `demo` command are built on top of
//! the roles; until the roles exist this crate only fixes its place in the workspace.
