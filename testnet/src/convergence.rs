//! Whether discovery converged: every running node's directory asked over the record exchange
//! by a short-lived observer identity.

use super::*;

impl Testnet {
    /// The records a node's discovery directory holds now, asked over the record exchange.
    pub fn known_by(&self, name: &str) -> anyhow::Result<Vec<NodeRecord>> {
        let peer = self.discovery_peer(name)?;
        Ok(block_on(
            async move { discovery::list_nodes(&peer).await },
        )??)
    }

    /// The hotkeys of the records a node's directory holds now, its own included, as the node
    /// names them: not verified again here (the node checked every record it kept), so a
    /// convergence poll costs the node one answer and this process no signature checks (with 17
    /// observers of 256 nodes polled every 100 ms, checking each record took a core). Asked
    /// through `exchanger`, whose connection to the node stays open from one poll to the next.
    async fn known_hotkeys(
        &self,
        exchanger: &mut discovery::Exchanger,
        name: &str,
    ) -> anyhow::Result<Vec<Hotkey>> {
        let peer = self.discovery_peer(name)?;
        let ask = horde_protocol::RecordSync {
            own: None,
            relayed: Vec::new(),
            want_all: true,
        };
        let answer = exchanger.exchange(&peer, ask, OBSERVER_TIMEOUT).await?;
        Ok(answer
            .own
            .iter()
            .chain(&answer.relayed)
            .map(|signed| *signed.signer())
            .collect())
    }

    /// Waits until the facilitator knows every running node and every validator knows every
    /// running miner.
    ///
    /// Each round asks only the observers still lacking a record (a directory fetch costs the
    /// observer and this process a QUIC handshake and a signature check per record: asking all
    /// of a 256-node network every round would take a core from the network it measures); once
    /// each was complete, one more round asks them all, and only a round that finds nobody
    /// lacking anything ends the wait.
    pub fn wait_converged(&self, timeout: Duration) -> anyhow::Result<()> {
        block_on(self.converge(timeout))?
    }

    async fn converge(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut complete = std::collections::HashSet::new();
        // One swarm for every poll: its connections to the observers stay open (a handshake
        // per observer, not per poll: at 256 nodes the polls opened ~5,000 connections).
        let mut exchanger = discovery::Exchanger::new(&SecretKey::generate())?;
        loop {
            let confirming = complete.len() == self.observers().count();
            if confirming {
                complete.clear();
            }
            let missing = self.missing_records(&mut exchanger, &mut complete).await;
            if missing.is_empty() {
                if confirming {
                    return Ok(());
                }
            } else if Instant::now() > deadline {
                // At 256 nodes the lists of names are long: their start is enough.
                let summary: Vec<String> = missing
                    .iter()
                    .map(|m| m.chars().take(300).collect())
                    .collect();
                bail!(
                    "discovery did not converge within {timeout:?}: {}",
                    summary.join("; ")
                );
            } else {
                tokio::time::sleep(CONVERGE_POLL).await;
            }
        }
    }

    fn running(&self, role: Option<Role>) -> impl Iterator<Item = &NodeProcess> {
        self.nodes
            .iter()
            .filter(move |n| n.child.is_some() && role.is_none_or(|r| n.role == r))
    }

    /// The running nodes whose directories convergence is judged by.
    fn observers(&self) -> impl Iterator<Item = &NodeProcess> {
        self.running(None)
            .filter(|n| matches!(n.role, Role::Facilitator | Role::Validator))
    }

    /// What each observer not yet in `complete` still lacks, as `observer: names`; observers
    /// found lacking nothing are added to `complete`.
    async fn missing_records(
        &self,
        exchanger: &mut discovery::Exchanger,
        complete: &mut std::collections::HashSet<String>,
    ) -> Vec<String> {
        let mut missing = Vec::new();
        for observer in self.observers() {
            if complete.contains(&observer.name) {
                continue;
            }
            // An observer too busy to answer now is asked again next round; the others are
            // still asked (what they lack is in the report).
            let known: Vec<Hotkey> = match self.known_hotkeys(exchanger, &observer.name).await {
                Ok(known) => known,
                Err(error) => {
                    missing.push(format!("{}: {error:#}", observer.name));
                    continue;
                }
            };
            let wanted = if observer.role == Role::Facilitator {
                self.running(None)
                    .filter(|n| n.name != observer.name)
                    .collect::<Vec<_>>()
            } else {
                self.running(Some(Role::Miner)).collect()
            };
            let lacking: Vec<&str> = wanted
                .iter()
                .filter(|n| !known.contains(&n.hotkey))
                .map(|n| n.name.as_str())
                .collect();
            if lacking.is_empty() {
                complete.insert(observer.name.clone());
            } else {
                missing.push(format!(
                    "{} lacks {} nodes: {}",
                    observer.name,
                    lacking.len(),
                    lacking.join(", ")
                ));
            }
        }
        missing
    }
}
