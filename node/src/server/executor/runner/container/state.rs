//! Container state read from the engine without bollard's models: `GET /containers/NAME/json`
//! and `GET /containers/json`, parsed leniently.
//!
//! bollard parses a container's `State.Status` into a closed enum of Docker's states, and
//! Podman's compatible service (4.3) answers states Docker does not have (`stopped`,
//! `configured`, …): every inspect or list of such a container then fails to parse, and the
//! runner would lose its job's exit or a stale container. These requests read only the fields
//! the runner uses, with the status as a string. One HTTP/1.0 request per connection (the
//! engine answers it whole, without chunking, and closes), bounded in time and size.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::engine::Engine;
use crate::server::executor::runner::RunnerError;

/// The longest answer read: a list of a few thousand containers.
const MAX_ANSWER: u64 = 16 << 20;

/// An inspect or list that takes longer is stuck.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the runner reads of a container's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct State {
    /// As the engine names it (`running`, `exited`, Podman's `stopped`, …).
    pub status: String,
    pub running: bool,
    /// The host pid of the container's first process while it runs.
    pub pid: i64,
    pub exit_code: i64,
    #[serde(rename = "OOMKilled")]
    pub oom_killed: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct Inspect {
    state: State,
}

/// A container of a list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct Listed {
    pub id: String,
    /// Podman answers `null` for a container without labels.
    #[serde(deserialize_with = "null_as_empty")]
    pub labels: HashMap<String, String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<HashMap<String, String>, D::Error> {
    Ok(Option::deserialize(deserializer)?.unwrap_or_default())
}

/// The state of container `name`; `None` when the engine has no such container.
pub(crate) async fn inspect(engine: &Engine, name: &str) -> Result<Option<State>, RunnerError> {
    let path = format!("/containers/{}/json", encode(name));
    Ok(get::<Inspect>(engine, &path, "inspecting the container")
        .await?
        .map(|inspect| inspect.state))
}

/// Every container (running or not) with `label` (`KEY` or `KEY=VALUE`).
pub(crate) async fn list(engine: &Engine, label: &str) -> Result<Vec<Listed>, RunnerError> {
    let filters = serde_json::json!({ "label": [label] }).to_string();
    let path = format!("/containers/json?all=true&filters={}", encode(&filters));
    Ok(get::<Vec<Listed>>(engine, &path, "listing containers")
        .await?
        .unwrap_or_default())
}

/// Percent-encodes everything but unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// `GET /vX.Y{path}`: the JSON answer, `None` on 404.
async fn get<T: DeserializeOwned>(
    engine: &Engine,
    path: &str,
    what: &str,
) -> Result<Option<T>, RunnerError> {
    let unavailable = |reason: String| RunnerError::EngineUnavailable {
        engine: engine.address.clone(),
        reason: format!("{what}: {reason}"),
    };
    let socket = engine
        .address
        .strip_prefix("unix://")
        .unwrap_or(&engine.address);
    let version = engine.docker.client_version();
    let request = format!(
        "GET /v{}.{}{path} HTTP/1.0\r\nHost: engine\r\n\r\n",
        version.major_version, version.minor_version
    );
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(MAX_ANSWER + 1).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => return Err(unavailable(error.to_string())),
        Err(_) => return Err(unavailable(format!("no answer within {ANSWER_TIMEOUT:?}"))),
    };
    let (status, body) = parse_answer(&answer).map_err(unavailable)?;
    match status {
        200 => serde_json::from_slice(body)
            .map(Some)
            .map_err(|error| RunnerError::Engine(format!("{what}: unreadable answer: {error}"))),
        404 => Ok(None),
        status => Err(RunnerError::Engine(format!(
            "{what}: the engine answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(512)]).trim()
        ))),
    }
}

/// The status code and body of a whole HTTP/1.x answer.
fn parse_answer(answer: &[u8]) -> Result<(u16, &[u8]), String> {
    if answer.len() as u64 > MAX_ANSWER {
        return Err(format!("an answer over {MAX_ANSWER} bytes"));
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(answer) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Err("the answer ended in its head".into()),
        Err(error) => return Err(format!("not an HTTP answer: {error}")),
    };
    let chunked = response.headers.iter().any(|header| {
        header.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(header.value)
                .to_ascii_lowercase()
                .contains("chunked")
    });
    if chunked {
        return Err("a chunked answer to an HTTP/1.0 request".into());
    }
    let status = response.code.ok_or("an answer without a status")?;
    Ok((status, &answer[head..]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn podman_states_and_null_labels_parse() {
        let inspect: Inspect = serde_json::from_str(
            r#"{"Id":"x","State":{"Status":"stopped","Running":false,"Pid":0,"ExitCode":137,
                "OOMKilled":true,"Health":{"Status":""}}}"#,
        )
        .unwrap();
        assert_eq!(inspect.state.status, "stopped");
        assert_eq!(inspect.state.exit_code, 137);
        assert!(inspect.state.oom_killed && !inspect.state.running);
        let listed: Vec<Listed> = serde_json::from_str(
            r#"[{"Id":"a","Labels":null,"State":"stopped"},
                {"Id":"b","Labels":{"horde.job":"j"},"State":"configured"}]"#,
        )
        .unwrap();
        assert!(listed[0].labels.is_empty());
        assert_eq!(listed[1].labels["horde.job"], "j");
    }

    #[test]
    fn answers_are_split_and_bad_ones_refused() {
        let (status, body) =
            parse_answer(b"HTTP/1.0 404 Not Found\r\nContent-Type: a\r\n\r\n{\"m\":1}").unwrap();
        assert_eq!((status, body), (404, &b"{\"m\":1}"[..]));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-").is_err());
        assert!(parse_answer(b"\x00\x01junk").is_err());
        assert_eq!(encode("a b/{\"c\"}"), "a%20b%2F%7B%22c%22%7D");
    }
}
