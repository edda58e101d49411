//! Accounting receipts: what a validator and a miner both sign about a job, for billing.
//!
//! For every job it sends to a miner, the validator issues up to three [`AccountingReceipt`]s —
//! [`ReceiptKind::Started`] when it sends the job, [`ReceiptKind::Accepted`] when the miner
//! reserves an executor, [`ReceiptKind::Finished`] when a job that got past acceptance ends —
//! each a [`Signed<AccountingReceipt>`] under the domain `horde/accounting-receipt/v1`. The miner
//! checks the receipt and answers with a [`Countersignature`]: its signature over the exact
//! validator-signed bytes under its own domain, [`COUNTERSIGN_DOMAIN`]. An [`AccountingRecord`]
//! is what both sides store: the receipt and, when the miner countersigned, its countersignature.
//!
//! [`AccountingRecord::verify`] checks the validator's signature (by the validator the payload
//! names) and, when present, the countersignature (by the miner the payload names);
//! [`AccountingReceipt::check_parties`] checks a receipt is about the job, validator and miner a
//! node expects.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::job::{ExecutorClass, JobId, Stage, UnixMillis};
use crate::keys::{Hotkey, SecretKey, SignatureError};
use crate::signed::{Signable, Signature, Signed, VerifyError};

#[cfg(test)]
use proptest_derive::Arbitrary;

/// The domain tag of the miner's countersignature, distinct from the validator's
/// (`horde/accounting-receipt/v1`), so neither signature can stand in for the other.
pub const COUNTERSIGN_DOMAIN: &str = "horde/accounting-countersign/v1";

/// What a receipt attests, with what only a finished job has.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum ReceiptKind {
    /// The validator sent the job to the miner.
    Started,
    /// The miner reserved an executor for the job.
    Accepted,
    /// The job ended after it was accepted.
    Finished {
        /// How it ended.
        outcome: JobOutcome,
        /// When the validator sent the job (the Started receipt's `issued_at`).
        started_at: UnixMillis,
        /// From `started_at` to the end, in milliseconds.
        time_took_ms: u64,
    },
}

impl ReceiptKind {
    /// `started`, `accepted` or `finished`.
    pub fn name(&self) -> &'static str {
        match self {
            ReceiptKind::Started => "started",
            ReceiptKind::Accepted => "accepted",
            ReceiptKind::Finished { .. } => "finished",
        }
    }
}

/// How an accepted job ended, as the validator saw it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum JobOutcome {
    /// The job ran to its end (exited or was terminated by its client).
    Completed,
    /// The job failed in a stage (non-zero exit, fetch or upload error, bad endpoint record).
    Failed {
        /// The stage.
        stage: Stage,
    },
    /// A stage's deadline passed.
    TimedOut {
        /// The stage.
        stage: Stage,
    },
    /// horde failed: a node died, a link broke, a peer violated the protocol.
    HordeFailed,
    /// The job was abandoned: its facilitator went away or the validator shut down.
    Cancelled,
}

impl fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobOutcome::Completed => f.write_str("completed"),
            JobOutcome::Failed { stage } => write!(f, "failed in {stage}"),
            JobOutcome::TimedOut { stage } => write!(f, "timed out in {stage}"),
            JobOutcome::HordeFailed => f.write_str("horde failed"),
            JobOutcome::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// The payload both sides sign: one event in the life of one job on one miner.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct AccountingReceipt {
    /// What happened.
    pub kind: ReceiptKind,
    /// The job.
    pub job_id: JobId,
    /// The validator that drove the job (must equal the signer).
    pub validator: Hotkey,
    /// The miner that ran it (must equal the countersigner).
    pub miner: Hotkey,
    /// The executor class the job used.
    pub executor_class: ExecutorClass,
    /// When the validator issued the receipt (its clock).
    pub issued_at: UnixMillis,
}

impl Signable for AccountingReceipt {
    const DOMAIN: &'static str = "horde/accounting-receipt/v1";
}

impl AccountingReceipt {
    /// Checks that the receipt is about `job_id`, issued by `validator` for `miner`.
    pub fn check_parties(
        &self,
        job_id: JobId,
        validator: &Hotkey,
        miner: &Hotkey,
    ) -> Result<(), ReceiptError> {
        if self.job_id != job_id {
            return Err(ReceiptError::WrongJob {
                expected: job_id,
                named: self.job_id,
            });
        }
        if self.validator != *validator {
            return Err(ReceiptError::WrongValidator {
                expected: *validator,
                named: self.validator,
            });
        }
        if self.miner != *miner {
            return Err(ReceiptError::WrongMiner {
                expected: *miner,
                named: self.miner,
            });
        }
        Ok(())
    }
}

/// The miner's signature over the exact bytes the validator signed, under
/// [`COUNTERSIGN_DOMAIN`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct Countersignature {
    /// Who countersigned (must equal the receipt's miner).
    pub miner: Hotkey,
    /// The signature.
    pub signature: Signature,
}

impl Countersignature {
    /// Countersigns `receipt` with the miner's key. Verify the receipt first: this signs
    /// whatever it is given.
    pub fn sign(key: &SecretKey, receipt: &Signed<AccountingReceipt>) -> Self {
        Self {
            miner: key.hotkey(),
            signature: key.sign(COUNTERSIGN_DOMAIN, receipt.bytes()),
        }
    }

    /// Checks that this countersignature is by the miner `payload` names and verifies over
    /// `receipt`'s bytes. `payload` must be what `receipt` decodes to.
    pub fn verify(
        &self,
        receipt: &Signed<AccountingReceipt>,
        payload: &AccountingReceipt,
    ) -> Result<(), ReceiptError> {
        if self.miner != payload.miner {
            return Err(ReceiptError::CountersignedByOther {
                miner: payload.miner,
                countersigner: self.miner,
            });
        }
        self.miner
            .verify(COUNTERSIGN_DOMAIN, receipt.bytes(), &self.signature)
            .map_err(ReceiptError::BadCountersignature)
    }
}

/// Why an accounting receipt or its countersignature was refused.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    /// The validator's signature does not verify, or the payload does not decode.
    #[error("bad validator signature: {0}")]
    BadValidatorSignature(VerifyError),
    /// The receipt is signed by another key than the validator it names.
    #[error("receipt names validator {named} but is signed by {signer}")]
    NotSignedByValidator {
        /// The validator the payload names.
        named: Hotkey,
        /// The key that signed.
        signer: Hotkey,
    },
    /// The countersignature is by another key than the miner the receipt names.
    #[error("receipt names miner {miner} but is countersigned by {countersigner}")]
    CountersignedByOther {
        /// The miner the payload names.
        miner: Hotkey,
        /// The key that countersigned.
        countersigner: Hotkey,
    },
    /// The countersignature does not verify over the receipt's bytes.
    #[error("bad countersignature: {0}")]
    BadCountersignature(SignatureError),
    /// A countersignature was required and there is none.
    #[error("not countersigned by the miner")]
    NotCountersigned,
    /// The receipt is about another job.
    #[error("receipt for job {named}, expected {expected}")]
    WrongJob {
        /// The job expected.
        expected: JobId,
        /// The job named.
        named: JobId,
    },
    /// The receipt names another validator.
    #[error("receipt names validator {named}, expected {expected}")]
    WrongValidator {
        /// The validator expected.
        expected: Hotkey,
        /// The validator named.
        named: Hotkey,
    },
    /// The receipt names another miner.
    #[error("receipt names miner {named}, expected {expected}")]
    WrongMiner {
        /// The miner expected.
        expected: Hotkey,
        /// The miner named.
        named: Hotkey,
    },
}

/// Verifies the validator's signature over a receipt and that the signer is the validator the
/// payload names.
pub fn verify_receipt(
    receipt: &Signed<AccountingReceipt>,
) -> Result<AccountingReceipt, ReceiptError> {
    let payload = receipt
        .verify()
        .map_err(ReceiptError::BadValidatorSignature)?;
    if payload.validator != *receipt.signer() {
        return Err(ReceiptError::NotSignedByValidator {
            named: payload.validator,
            signer: *receipt.signer(),
        });
    }
    Ok(payload)
}

/// A receipt as both sides store it: signed by the validator, countersigned by the miner when it
/// did so in time.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct AccountingRecord {
    /// The validator-signed receipt.
    pub receipt: Signed<AccountingReceipt>,
    /// The miner's countersignature; `None` when the miner did not give one.
    pub countersignature: Option<Countersignature>,
}

/// An [`AccountingRecord`] whose signatures verified.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VerifiedRecord {
    /// The payload.
    pub receipt: AccountingReceipt,
    /// Whether a valid countersignature by the named miner is attached.
    pub countersigned: bool,
}

impl AccountingRecord {
    /// Verifies the validator's signature and, when present, the miner's countersignature, each
    /// by the party the payload names. An absent countersignature is reported, not refused.
    pub fn verify(&self) -> Result<VerifiedRecord, ReceiptError> {
        let receipt = verify_receipt(&self.receipt)?;
        if let Some(countersignature) = &self.countersignature {
            countersignature.verify(&self.receipt, &receipt)?;
        }
        Ok(VerifiedRecord {
            countersigned: self.countersignature.is_some(),
            receipt,
        })
    }

    /// Like [`AccountingRecord::verify`], and requires the countersignature.
    pub fn verify_countersigned(&self) -> Result<AccountingReceipt, ReceiptError> {
        let verified = self.verify()?;
        if !verified.countersigned {
            return Err(ReceiptError::NotCountersigned);
        }
        Ok(verified.receipt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{from_bytes_exact, to_bytes};

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed(&[seed; 32])
    }

    const JOB: JobId = JobId([7; 16]);

    fn payload(validator: &SecretKey, miner: &SecretKey) -> AccountingReceipt {
        AccountingReceipt {
            kind: ReceiptKind::Finished {
                outcome: JobOutcome::Completed,
                started_at: UnixMillis(1_000),
                time_took_ms: 250,
            },
            job_id: JOB,
            validator: validator.hotkey(),
            miner: miner.hotkey(),
            executor_class: ExecutorClass("cpu".into()),
            issued_at: UnixMillis(1_250),
        }
    }

    fn record(validator: &SecretKey, miner: &SecretKey) -> AccountingRecord {
        let receipt = Signed::sign(validator, &payload(validator, miner));
        let countersignature = Some(Countersignature::sign(miner, &receipt));
        AccountingRecord {
            receipt,
            countersignature,
        }
    }

    #[test]
    fn a_countersigned_record_verifies() {
        let (validator, miner) = (key(1), key(2));
        let record = record(&validator, &miner);
        assert_eq!(
            record.verify().unwrap(),
            VerifiedRecord {
                receipt: payload(&validator, &miner),
                countersigned: true
            }
        );
        let receipt = record.verify_countersigned().unwrap();
        receipt
            .check_parties(JOB, &validator.hotkey(), &miner.hotkey())
            .unwrap();
        // Survives the wire.
        let back: AccountingRecord = from_bytes_exact(&to_bytes(&record)).unwrap();
        assert!(back.verify_countersigned().is_ok());
    }

    #[test]
    fn an_uncountersigned_record_verifies_but_is_reported() {
        let (validator, miner) = (key(1), key(2));
        let mut record = record(&validator, &miner);
        record.countersignature = None;
        assert!(!record.verify().unwrap().countersigned);
        assert_eq!(
            record.verify_countersigned(),
            Err(ReceiptError::NotCountersigned)
        );
    }

    #[test]
    fn receipt_signed_by_another_than_the_named_validator_is_refused() {
        let (validator, miner, impostor) = (key(1), key(2), key(3));
        // The impostor signs a receipt naming the real validator.
        let receipt = Signed::sign(&impostor, &payload(&validator, &miner));
        let forged = AccountingRecord {
            countersignature: Some(Countersignature::sign(&miner, &receipt)),
            receipt,
        };
        assert_eq!(
            forged.verify(),
            Err(ReceiptError::NotSignedByValidator {
                named: validator.hotkey(),
                signer: impostor.hotkey()
            })
        );
        // Checked against the validator a node expects, a well-signed receipt by someone else
        // is refused too.
        let other = record(&impostor, &miner);
        assert_eq!(
            other.verify().unwrap().receipt.check_parties(
                JOB,
                &validator.hotkey(),
                &miner.hotkey()
            ),
            Err(ReceiptError::WrongValidator {
                expected: validator.hotkey(),
                named: impostor.hotkey()
            })
        );
    }

    #[test]
    fn receipt_for_another_miner_or_job_is_refused() {
        let (validator, miner, other) = (key(1), key(2), key(4));
        let receipt = record(&validator, &other).verify().unwrap().receipt;
        assert_eq!(
            receipt.check_parties(JOB, &validator.hotkey(), &miner.hotkey()),
            Err(ReceiptError::WrongMiner {
                expected: miner.hotkey(),
                named: other.hotkey()
            })
        );
        let receipt = record(&validator, &miner).verify().unwrap().receipt;
        assert_eq!(
            receipt.check_parties(JobId([8; 16]), &validator.hotkey(), &miner.hotkey()),
            Err(ReceiptError::WrongJob {
                expected: JobId([8; 16]),
                named: JOB
            })
        );
    }

    #[test]
    fn tampered_payload_is_refused() {
        let (validator, miner) = (key(1), key(2));
        let record = record(&validator, &miner);
        let mut bytes = record.receipt.bytes().to_vec();
        // The last byte is part of `issued_at`: move the time.
        if let Some(last) = bytes.last_mut() {
            *last ^= 0x01;
        }
        let tampered = AccountingRecord {
            receipt: Signed::from_parts(
                bytes,
                *record.receipt.signer(),
                *record.receipt.signature(),
            ),
            countersignature: record.countersignature,
        };
        assert!(matches!(
            tampered.verify(),
            Err(ReceiptError::BadValidatorSignature(
                VerifyError::BadSignature { .. }
            ))
        ));
    }

    #[test]
    fn countersignature_by_another_key_is_refused() {
        let (validator, miner, other) = (key(1), key(2), key(5));
        let mut record = record(&validator, &miner);
        // Another key countersigns and says so.
        record.countersignature = Some(Countersignature::sign(&other, &record.receipt));
        assert_eq!(
            record.verify(),
            Err(ReceiptError::CountersignedByOther {
                miner: miner.hotkey(),
                countersigner: other.hotkey()
            })
        );
        // Another key countersigns and claims to be the miner.
        let forged = Countersignature {
            miner: miner.hotkey(),
            signature: Countersignature::sign(&other, &record.receipt).signature,
        };
        record.countersignature = Some(forged);
        assert_eq!(
            record.verify(),
            Err(ReceiptError::BadCountersignature(SignatureError::Invalid))
        );
    }

    #[test]
    fn signatures_do_not_cross_domains() {
        let (validator, miner) = (key(1), key(2));
        let record = record(&validator, &miner);
        // The validator's own signature presented as the miner's countersignature of the same
        // bytes (a validator that is also the miner): wrong domain, refused.
        let same_key = AccountingRecord {
            receipt: Signed::sign(&validator, &payload(&validator, &validator)),
            countersignature: None,
        };
        let masquerade = Countersignature {
            miner: validator.hotkey(),
            signature: *same_key.receipt.signature(),
        };
        let same_key = AccountingRecord {
            countersignature: Some(masquerade),
            ..same_key
        };
        assert_eq!(
            same_key.verify(),
            Err(ReceiptError::BadCountersignature(SignatureError::Invalid))
        );
        // A countersignature for one receipt does not countersign another.
        let mut other = record.clone();
        other.receipt = Signed::sign(
            &validator,
            &AccountingReceipt {
                kind: ReceiptKind::Started,
                ..payload(&validator, &miner)
            },
        );
        assert_eq!(
            other.verify(),
            Err(ReceiptError::BadCountersignature(SignatureError::Invalid))
        );
    }
}
