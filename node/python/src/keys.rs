//! `horde.Key`: an ed25519 account or client key, in the same JSON key files as the `horde`
//! command (Bittensor's field names; written `0600`, refused when group or others can read
//! them), shown as an SS58 address.

use std::path::PathBuf;

use horde_protocol::SecretKey;
use pyo3::prelude::*;

use crate::errors::HordeError;

pyo3::create_exception!(
    horde,
    KeyFileError,
    HordeError,
    "A key file that cannot be used: unreadable, readable by group or others, malformed, or \
     (when saving) already there."
);

/// An ed25519 secret key: a client's account key, or a job's per-job client key.
#[pyclass(module = "horde._native", frozen)]
#[derive(Debug, Clone)]
pub(crate) struct Key {
    pub(crate) secret: SecretKey,
}

#[pymethods]
impl Key {
    /// A new random key.
    #[staticmethod]
    fn generate() -> Self {
        Self {
            secret: SecretKey::generate(),
        }
    }

    /// Reads a JSON key file; refused when group or others may read it (mode must be 0600).
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        let secret =
            SecretKey::read_key_file(&path).map_err(|e| KeyFileError::new_err(e.to_string()))?;
        Ok(Self { secret })
    }

    /// Writes the key as a JSON key file with mode 0600; never overwrites an existing file.
    fn save(&self, path: PathBuf) -> PyResult<()> {
        self.secret
            .write_key_file(&path)
            .map_err(|e| KeyFileError::new_err(e.to_string()))
    }

    /// The public key as an SS58 address (prefix 42).
    #[getter]
    fn ss58(&self) -> String {
        self.secret.hotkey().to_ss58()
    }

    /// The public key as 64 hex digits.
    #[getter]
    fn public_hex(&self) -> String {
        self.secret.hotkey().to_hex()
    }

    fn __repr__(&self) -> String {
        format!("Key({})", self.ss58())
    }

    fn __eq__(&self, other: &Self) -> bool {
        self.secret.hotkey() == other.secret.hotkey()
    }
}

pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add("KeyFileError", module.py().get_type::<KeyFileError>())?;
    module.add_class::<Key>()?;
    Ok(())
}
