//! `horde receipts`: lists the accounting receipts a validator or miner stored, verifying each.
//!
//! Reads `<data-dir>/receipts.log` read-only (safe while the node runs), keeps the receipts whose
//! `issued_at` (the validator's clock) is in `[--since, --until)`, verifies each one's
//! signatures, and prints a table or, with `--json`, a JSON array. Times are RFC 3339
//! (`2026-11-28T23:38:05Z`, `2026-11-28T23:38:05.250+01:00`) or Unix seconds (`1795995485`);
//! the table shows them in UTC. A receipt that fails verification is listed as `INVALID` with
//! the reason, and the command then exits with an error; so does a damaged log, after listing the
//! receipts before the damage.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use horde_protocol::codec::from_bytes_exact;
use horde_protocol::{AccountingReceipt, ReceiptError, ReceiptKind, UnixMillis};

use crate::server::receipts::{LogContents, StoredReceipt, TimeWindow, log_path, read_log};

/// `horde receipts` arguments.
#[derive(Debug, clap::Args)]
pub struct ReceiptsArgs {
    /// The validator's or miner's data directory (the one holding receipts.log).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Only receipts issued at or after this time: RFC 3339 (2026-11-28T23:38:05Z) or Unix
    /// seconds.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<UnixMillis>,
    /// Only receipts issued before this time: RFC 3339 or Unix seconds.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<UnixMillis>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One listed receipt: what it says, and whether it verified.
#[derive(Debug)]
struct Row {
    entry: StoredReceipt,
    /// The payload as stored (decoded without trusting it, for display).
    payload: Option<AccountingReceipt>,
    /// `Ok(countersigned)` when the signatures verified.
    verified: Result<bool, ReceiptError>,
}

/// Runs `horde receipts`: prints to stdout, warnings to stderr.
pub fn run(args: &ReceiptsArgs) -> anyhow::Result<()> {
    let window = TimeWindow {
        since: args.since,
        until: args.until,
    };
    if let (Some(since), Some(until)) = (window.since, window.until)
        && since >= until
    {
        bail!("--since must be earlier than --until");
    }
    let path = log_path(&args.data_dir);
    if !path.is_file() {
        bail!(
            "no receipt log at {}: is {} the data directory of a validator or miner?",
            path.display(),
            args.data_dir.display()
        );
    }
    let mut contents = read_log(&path)?;
    let damage = contents.damage.take();
    if let Some((offset, len)) = contents.torn_tail {
        eprintln!(
            "note: skipped an incomplete record of {len} bytes at offset {offset} (being \
             written now, or torn by a crash)"
        );
    }
    let rows = select(contents, window);
    let invalid = rows.iter().filter(|row| row.verified.is_err()).count();
    if args.json {
        let list: Vec<serde_json::Value> = rows.iter().map(json_row).collect();
        out!(
            "{}",
            serde_json::to_string_pretty(&list).context("encoding JSON")?
        );
    } else {
        out_part!("{}", table(&rows));
    }
    if let Some(damage) = damage {
        bail!("{damage}; only the receipts before it are listed");
    }
    if invalid > 0 {
        bail!("{invalid} receipt(s) failed verification");
    }
    Ok(())
}

/// The entries in the window, verified, in order of issue (the log is in order of storing:
/// receipts settle concurrently). An entry whose payload does not even decode has no time and is
/// always listed (as invalid), first.
fn select(contents: LogContents, window: TimeWindow) -> Vec<Row> {
    let mut rows: Vec<Row> = contents
        .entries
        .into_iter()
        .filter_map(|entry| {
            let payload: Option<AccountingReceipt> =
                from_bytes_exact(entry.record.receipt.bytes()).ok();
            if let Some(payload) = &payload
                && !window.contains(payload.issued_at)
            {
                return None;
            }
            let verified = entry.record.verify().map(|verified| verified.countersigned);
            Some(Row {
                entry,
                payload,
                verified,
            })
        })
        .collect();
    rows.sort_by_key(|row| {
        row.payload.as_ref().map(|p| {
            let order = match p.kind {
                ReceiptKind::Started => 0,
                ReceiptKind::Accepted => 1,
                _ => 2,
            };
            (p.issued_at, order)
        })
    });
    rows
}

fn details(row: &Row) -> String {
    let mut text = String::new();
    if let Some(AccountingReceipt {
        kind:
            ReceiptKind::Finished {
                outcome,
                time_took_ms,
                ..
            },
        ..
    }) = &row.payload
    {
        let _ = write!(
            text,
            "{outcome} after {:.3}s",
            *time_took_ms as f64 / 1000.0
        );
    }
    let extra = match &row.verified {
        Err(error) => Some(error.to_string()),
        Ok(false) => Some(format!(
            "not countersigned: {}",
            row.entry.note.as_deref().unwrap_or("no reason recorded")
        )),
        Ok(true) => None,
    };
    if let Some(extra) = extra {
        if !text.is_empty() {
            text.push_str("; ");
        }
        text.push_str(&extra);
    }
    text
}

fn countersigned(row: &Row) -> &'static str {
    match row.verified {
        Ok(true) => "yes",
        Ok(false) => "no",
        Err(_) => "INVALID",
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9} {:<32} {:<10} {:<10} {:<20} {:<13} DETAILS",
        "KIND", "JOB", "VALIDATOR", "MINER", "ISSUED (UTC)", "COUNTERSIGNED"
    );
    for row in rows {
        let (kind, job, validator, miner, issued) = match &row.payload {
            Some(p) => (
                p.kind.name().to_owned(),
                p.job_id.to_string(),
                p.validator.fmt_short(),
                p.miner.fmt_short(),
                format_time(p.issued_at, false),
            ),
            None => {
                let unknown = || "?".to_owned();
                (unknown(), unknown(), unknown(), unknown(), unknown())
            }
        };
        let line = format!(
            "{kind:<9} {job:<32} {validator:<10} {miner:<10} {issued:<20} {:<13} {}",
            countersigned(row),
            details(row)
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let signed = rows.iter().filter(|r| r.verified == Ok(true)).count();
    let _ = writeln!(out, "{} receipt(s), {signed} countersigned", rows.len());
    out
}

fn json_row(row: &Row) -> serde_json::Value {
    let mut value = serde_json::json!({
        "countersigned": row.verified == Ok(true),
        "valid": row.verified.is_ok(),
        "stored_at_ms": row.entry.stored_at.0,
        "note": row.entry.note,
    });
    if let Err(error) = &row.verified {
        value["error"] = error.to_string().into();
    }
    if let Some(p) = &row.payload {
        value["kind"] = p.kind.name().into();
        value["job_id"] = p.job_id.to_string().into();
        value["validator"] = p.validator.to_string().into();
        value["miner"] = p.miner.to_string().into();
        value["executor_class"] = p.executor_class.0.clone().into();
        value["issued_at_ms"] = p.issued_at.0.into();
        value["issued_at"] = format_time(p.issued_at, true).into();
        if let ReceiptKind::Finished {
            outcome,
            started_at,
            time_took_ms,
        } = &p.kind
        {
            value["outcome"] = outcome.to_string().into();
            value["started_at_ms"] = started_at.0.into();
            value["time_took_ms"] = (*time_took_ms).into();
        }
    }
    value
}

/// Milliseconds in a day.
const DAY_MS: u64 = 86_400_000;

/// Parses a time for `--since` / `--until`: Unix seconds, or RFC 3339 with a `Z` or `±HH:MM`
/// offset and optional fractional seconds (kept to the millisecond).
pub fn parse_time(text: &str) -> Result<UnixMillis, TimeError> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .ok()
            .and_then(|seconds| seconds.checked_mul(1000))
            .map(UnixMillis)
            .ok_or_else(|| TimeError::SecondsOutOfRange(text.to_owned()));
    }
    parse_rfc3339(text).map_err(|reason| TimeError::NotRfc3339 {
        text: text.to_owned(),
        reason,
    })
}

/// A `--since` / `--until` value that is not a time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimeError {
    /// Unix seconds past what milliseconds in a `u64` hold.
    #[error("{0:?}: Unix seconds out of range")]
    SecondsOutOfRange(String),
    /// Neither Unix seconds nor an RFC 3339 time.
    #[error("{text:?}: {reason} (expected RFC 3339 like 2026-11-28T23:38:05Z, or Unix seconds)")]
    NotRfc3339 {
        /// The value given.
        text: String,
        /// What is wrong with it as RFC 3339.
        reason: Rfc3339Error,
    },
}

/// What is wrong with an RFC 3339 time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rfc3339Error {
    /// A field that should be digits is not.
    #[error("bad {0}")]
    Number(&'static str),
    /// A separator is missing.
    #[error("expected {what} at position {position}")]
    Separator {
        /// The separator expected.
        what: &'static str,
        /// Where (1-based).
        position: usize,
    },
    /// A `.` without a fraction after it.
    #[error("no digits after '.'")]
    NoFraction,
    /// An offset past ±23:59.
    #[error("offset out of range")]
    OffsetOutOfRange,
    /// Neither `Z` nor `±HH:MM` at the end.
    #[error("expected 'Z' or an offset like +01:00 at the end")]
    NoOffset,
    /// A year before 1970 or after 9999.
    #[error("year out of range (1970 to 9999)")]
    YearOutOfRange,
    /// A month or day that does not exist.
    #[error("no such date")]
    NoSuchDate,
    /// An hour, minute or second out of range.
    #[error("time out of range")]
    TimeOutOfRange,
    /// In range locally, but before the epoch once the offset is applied.
    #[error("before 1970")]
    Before1970,
}

fn parse_rfc3339(text: &str) -> Result<UnixMillis, Rfc3339Error> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>, what: &'static str| {
        let digits = bytes
            .get(range)
            .filter(|d| d.iter().all(u8::is_ascii_digit))
            .ok_or(Rfc3339Error::Number(what))?;
        Ok(digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
    };
    let separator = |at: usize, allowed: &[u8], what: &'static str| match bytes.get(at) {
        Some(b) if allowed.contains(b) => Ok(()),
        _ => Err(Rfc3339Error::Separator {
            what,
            position: at + 1,
        }),
    };
    let year = number(0..4, "year")?;
    separator(4, b"-", "'-'")?;
    let month = number(5..7, "month")?;
    separator(7, b"-", "'-'")?;
    let day = number(8..10, "day")?;
    separator(10, b"Tt ", "'T'")?;
    let hour = number(11..13, "hour")?;
    separator(13, b":", "':'")?;
    let minute = number(14..16, "minute")?;
    separator(16, b":", "':'")?;
    let second = number(17..19, "second")?;
    let mut at = 19;
    let mut millis = 0;
    if bytes.get(at) == Some(&b'.') {
        let digits = bytes[at + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            return Err(Rfc3339Error::NoFraction);
        }
        // Milliseconds: the first three digits, padded.
        let kept = number(at + 1..at + 1 + digits.min(3), "fraction")?;
        millis = kept * 10u64.pow(3 - digits.min(3) as u32);
        at += 1 + digits;
    }
    let offset_minutes: i64 = match bytes.get(at) {
        Some(b'Z' | b'z') if at + 1 == bytes.len() => 0,
        Some(sign @ (b'+' | b'-')) if at + 6 == bytes.len() => {
            separator(at + 3, b":", "':' in the offset")?;
            let hours = number(at + 1..at + 3, "offset hours")?;
            let minutes = number(at + 4..at + 6, "offset minutes")?;
            if hours > 23 || minutes > 59 {
                return Err(Rfc3339Error::OffsetOutOfRange);
            }
            let total =
                i64::try_from(hours * 60 + minutes).map_err(|_| Rfc3339Error::OffsetOutOfRange)?;
            if *sign == b'-' { -total } else { total }
        }
        _ => return Err(Rfc3339Error::NoOffset),
    };
    if !(1970..=9999).contains(&year) {
        return Err(Rfc3339Error::YearOutOfRange);
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(Rfc3339Error::NoSuchDate);
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(Rfc3339Error::TimeOutOfRange);
    }
    let days = days_from_civil(year, month, day);
    let local_ms = days * DAY_MS + ((hour * 60 + minute) * 60 + second) * 1000 + millis;
    let offset_ms = offset_minutes * 60_000;
    let utc = i64::try_from(local_ms).map_err(|_| Rfc3339Error::YearOutOfRange)? - offset_ms;
    u64::try_from(utc)
        .map(UnixMillis)
        .map_err(|_| Rfc3339Error::Before1970)
}

fn is_leap(year: u64) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date at or after it (Howard Hinnant's `days_from_civil`, for
/// non-negative eras).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day counted from 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// RFC 3339 in UTC, to the second or (with `millis`) the millisecond.
pub fn format_time(at: UnixMillis, millis: bool) -> String {
    let (year, month, day) = civil_from_days(at.0 / DAY_MS);
    let in_day = at.0 % DAY_MS;
    let (hour, minute, second) = (in_day / 3_600_000, in_day / 60_000 % 60, in_day / 1000 % 60);
    let mut text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}");
    if millis {
        let _ = write!(text, ".{:03}", in_day % 1000);
    }
    text.push('Z');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::receipts::{DEFAULT_MAX_LOG_BYTES, ReceiptLog, test_support};
    use horde_protocol::{Countersignature, JobId, JobOutcome, SecretKey, Stage};

    fn stored(kind: ReceiptKind, at: u64, countersign: bool, note: Option<&str>) -> StoredReceipt {
        test_support::stored(kind, JobId([9; 16]), UnixMillis(at), countersign, note)
    }

    #[test]
    fn listing_verifies_orders_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path());
        let mut log = ReceiptLog::open(&path, DEFAULT_MAX_LOG_BYTES).unwrap();
        let finished = ReceiptKind::Finished {
            outcome: JobOutcome::Failed {
                stage: Stage::Upload,
            },
            started_at: UnixMillis(10_000),
            time_took_ms: 1_500,
        };
        // Stored out of order, as concurrent exchanges settle.
        log.append(&stored(
            ReceiptKind::Accepted,
            10_000,
            false,
            Some("no countersignature within 5s"),
        ))
        .unwrap();
        log.append(&stored(ReceiptKind::Started, 10_000, true, None))
            .unwrap();
        log.append(&stored(finished, 11_500, true, None)).unwrap();
        // A receipt whose countersignature was swapped for another miner's.
        let mut forged = stored(ReceiptKind::Started, 20_000, true, None);
        forged.record.countersignature = Some(Countersignature::sign(
            &SecretKey::from_seed(&[3; 32]),
            &forged.record.receipt,
        ));
        log.append(&forged).unwrap();
        // Outside the window.
        log.append(&stored(ReceiptKind::Started, 30_000, true, None))
            .unwrap();

        let window = TimeWindow {
            since: Some(UnixMillis(10_000)),
            until: Some(UnixMillis(30_000)),
        };
        let rows = select(read_log(&path).unwrap(), window);
        let shown = table(&rows);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 6, "{shown}");
        assert!(lines[0].starts_with("KIND"), "{shown}");
        assert!(
            lines[1].starts_with("started") && lines[1].ends_with(" yes"),
            "{shown}"
        );
        assert!(
            lines[2].starts_with("accepted")
                && lines[2].contains(" no ")
                && lines[2].ends_with("not countersigned: no countersignature within 5s"),
            "{shown}"
        );
        assert!(
            lines[3].starts_with("finished") && lines[3].ends_with("failed in Upload after 1.500s"),
            "{shown}"
        );
        assert!(
            lines[4].contains("INVALID") && lines[4].contains("countersigned by"),
            "{shown}"
        );
        assert_eq!(lines[5], "4 receipt(s), 2 countersigned");
        assert!(lines[1].contains("1970-01-01T00:00:10Z"), "{shown}");

        let json: Vec<serde_json::Value> = rows.iter().map(json_row).collect();
        assert_eq!(json[2]["outcome"], "failed in Upload");
        assert_eq!(json[2]["time_took_ms"], 1_500);
        assert_eq!(json[1]["countersigned"], false);
        assert_eq!(json[1]["valid"], true);
        assert_eq!(json[3]["valid"], false);
        assert_eq!(json[0]["issued_at"], "1970-01-01T00:00:10.000Z");
    }

    #[test]
    fn times_parse_in_both_forms() {
        assert_eq!(parse_time("0"), Ok(UnixMillis(0)));
        assert_eq!(parse_time("1795995485"), Ok(UnixMillis(1_795_995_485_000)));
        assert_eq!(
            parse_time("1970-01-01T00:00:00Z"),
            Ok(UnixMillis(0)),
            "the epoch"
        );
        assert_eq!(
            parse_time("2000-03-01T00:00:00Z"),
            Ok(UnixMillis(951_868_800_000))
        );
        assert_eq!(
            parse_time("2024-02-29T12:34:56.789Z"),
            Ok(UnixMillis(1_709_210_096_789))
        );
        assert_eq!(
            parse_time("2024-02-29T13:34:56.7891+01:00"),
            Ok(UnixMillis(1_709_210_096_789))
        );
        assert_eq!(
            parse_time("2024-02-29 07:04:56.5-05:30"),
            Ok(UnixMillis(1_709_210_096_500))
        );
    }

    #[test]
    fn bad_times_are_refused_with_a_reason() {
        for (text, needle) in [
            ("", "expected RFC 3339"),
            ("yesterday", "bad year"),
            ("2023-02-29T00:00:00Z", "no such date"),
            ("2023-13-01T00:00:00Z", "no such date"),
            ("2023-01-01T24:00:00Z", "time out of range"),
            ("2023-01-01T00:00:00", "expected 'Z'"),
            ("2023-01-01T00:00:00+0100", "expected 'Z'"),
            ("2023-01-01T00:00:00.Z", "no digits"),
            ("1969-12-31T23:59:59Z", "year out of range"),
            ("1970-01-01T00:30:00+01:00", "before 1970"),
            ("99999999999999999999", "out of range"),
            ("-5", "bad year"),
        ] {
            let error = parse_time(text).unwrap_err().to_string();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
    }

    #[test]
    fn formatting_inverts_parsing() {
        for text in [
            "1970-01-01T00:00:00.000Z",
            "1999-12-31T23:59:59.999Z",
            "2000-02-29T00:00:00.001Z",
            "2100-03-01T12:00:00.000Z",
            "2026-11-28T23:38:05.250Z",
        ] {
            assert_eq!(format_time(parse_time(text).unwrap(), true), text);
        }
        // Every day of four centuries round-trips through the civil conversions.
        for days in 0..146_097 {
            let (year, month, day) = civil_from_days(days);
            assert!(day >= 1 && day <= days_in_month(year, month));
            assert_eq!(days_from_civil(year, month, day), days);
        }
        assert_eq!(
            format_time(UnixMillis(1_709_210_096_789), false),
            "2024-02-29T12:34:56Z"
        );
    }
}
