//! `horde nodes`: what a node has discovered, as a table or JSON lines.

use horde_protocol::{ClassCapacity, NodeRecord, STORAGE_CAPACITY_CLASS};

use crate::clock::now;
use crate::server::discovery::{BootstrapPeer, list_nodes};

/// Asks the node at `peer`'s discovery listener for its directory and prints it.
pub(crate) async fn run(peer: &BootstrapPeer, json: bool) -> anyhow::Result<()> {
    let records = list_nodes(peer).await?;
    print_nodes(&records, json);
    Ok(())
}

/// Prints records as a table (or JSON lines).
fn print_nodes(records: &[NodeRecord], json: bool) {
    let now = now();
    if !json {
        out!(
            "{:<12} {:<50} {:<24} {:<18} expires in",
            "role",
            "hotkey",
            "quic address",
            "free/total, held"
        );
    }
    for record in records {
        let addrs: Vec<String> = record.addrs.iter().map(ToString::to_string).collect();
        let capacity: Vec<String> = record.capacity.iter().map(show_capacity).collect();
        let expires_s = record.expires_at.0.saturating_sub(now.0) as f64 / 1000.0;
        if json {
            let line = serde_json::json!({
                "role": record.role.as_str(),
                "hotkey": record.hotkey.to_string(),
                "addrs": addrs,
                "p2p_addrs": record.p2p_addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "capacity": capacity,
                "version": record.version,
                "seq": record.seq,
                "expires_in_s": expires_s,
            });
            out!("{line}");
        } else {
            out!(
                "{:<12} {:<50} {:<24} {:<18} {expires_s:.1} s",
                record.role.as_str(),
                record.hotkey.to_string(),
                addrs.join(","),
                if capacity.is_empty() {
                    "-".to_owned()
                } else {
                    capacity.join(",")
                },
            );
        }
    }
}

/// One capacity entry: `class:free/total` executors, or a storage node's space as
/// `held/cap MiB`.
fn show_capacity(capacity: &ClassCapacity) -> String {
    if capacity.class.0 == STORAGE_CAPACITY_CLASS {
        let held = capacity.total.saturating_sub(capacity.free);
        format!("{held}/{} MiB", capacity.total)
    } else {
        format!("{}:{}/{}", capacity.class, capacity.free, capacity.total)
    }
}

#[cfg(test)]
mod tests {
    use horde_protocol::ExecutorClass;

    use super::*;

    #[test]
    fn a_storage_node_shows_what_it_holds_of_its_cap() {
        let storage = ClassCapacity {
            class: ExecutorClass(STORAGE_CAPACITY_CLASS.to_owned()),
            free: 30,
            total: 50,
        };
        assert_eq!(show_capacity(&storage), "20/50 MiB");
        let miner = ClassCapacity {
            class: ExecutorClass("cpu".to_owned()),
            free: 1,
            total: 2,
        };
        assert_eq!(show_capacity(&miner), "cpu:1/2");
    }
}
