//! `horde key …`: create or inspect hotkey files.

use std::path::PathBuf;

use horde_protocol::SecretKey;

/// `horde key …`.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Generate a new hotkey and write it as a JSON key file with mode 0600.
    Generate {
        /// Where to write the key file (never overwritten).
        #[arg(long, short, default_value = "hotkey.json")]
        out: PathBuf,
    },
    /// Show the SS58 address and hex public key of a key file.
    Show {
        /// The key file.
        #[arg(default_value = "hotkey.json")]
        file: PathBuf,
    },
}

/// Runs a `horde key` command.
pub(crate) fn run(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Generate { out } => {
            let key = SecretKey::generate();
            key.write_key_file(&out)?;
            let hotkey = key.hotkey();
            out!("wrote {}", out.display());
            out!("ss58: {hotkey}");
            out!("hex:  0x{}", hotkey.to_hex());
        }
        KeyCommand::Show { file } => {
            let hotkey = SecretKey::read_key_file(&file)?.hotkey();
            out!("ss58: {hotkey}");
            out!("hex:  0x{}", hotkey.to_hex());
        }
    }
    Ok(())
}
