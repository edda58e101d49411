//! The unisolated runner: the job as a plain child process of the executor, with the node's
//! user and files. Used only where the process runner cannot isolate jobs and the config says
//! `allow_unisolated = true`.
//!
//! The job runs in its own process group, beside a group guard (`horde guard-group`, see
//! [`crate::server::supervision`]) that kills that group if the executor ends without stopping it. Its port
//! and its outputs listener are on the host's loopback.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use horde_protocol::Program;
use tokio::net::TcpListener;
use tracing::warn;

use super::{
    EXECUTOR_URL_ENV, JOB_PORT_ENV, JobDialer, JobEvent, JobExit, JobProcess, Launch,
    OUTPUT_DIR_ENV, Runner, RunnerError, VOLUME_DIR_ENV,
};
use crate::server::EXECUTOR_TOKEN_ENV;
use crate::server::supervision;

/// Runs jobs as plain child processes.
#[derive(Debug)]
pub struct UnisolatedRunner;

#[async_trait]
impl Runner for UnisolatedRunner {
    async fn start(&self, launch: Launch) -> Result<Box<dyn JobProcess>, RunnerError> {
        let Program::Command { program } = &launch.program else {
            return Err(RunnerError::Refused(
                "this executor runs commands, not container images".into(),
            ));
        };
        let io = |context: &'static str| move |e| RunnerError::io(context, e);
        let outputs = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(io("outputs listener"))?;
        let executor_url = format!("http://{}", outputs.local_addr().map_err(io("outputs"))?);
        // A port of the host's loopback: the job has no network namespace of its own.
        let port = {
            let probe = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(io("job port"))?;
            probe.local_addr().map_err(io("job port"))?.port()
        };
        let dir = &launch.job_dir;
        let logs = dir.join("logs/output");
        let stdout = std::fs::File::create(logs.join("stdout")).map_err(io("stdout log"))?;
        let stderr = std::fs::File::create(logs.join("stderr")).map_err(io("stderr log"))?;
        let child = tokio::process::Command::new(program)
            .args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(JOB_PORT_ENV, port.to_string())
            .env(VOLUME_DIR_ENV, dir.join("volume"))
            .env(OUTPUT_DIR_ENV, dir.join("output"))
            .env(EXECUTOR_URL_ENV, executor_url)
            .env_remove(EXECUTOR_TOKEN_ENV)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RunnerError::Spawn {
                program: program.clone(),
                reason: e.to_string(),
            })?;
        let pid = child.id();
        // Killed (with the job's group) if this executor ends without stopping the job.
        let guard = pid.and_then(|pid| {
            supervision::guard_command(pid)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .inspect_err(|error| warn!(%error, "could not start the job's group guard"))
                .ok()
        });
        Ok(Box::new(UnisolatedJob {
            child,
            pid,
            _guard: guard,
            outputs,
            target: Arc::new(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
            exit: None,
        }))
    }
}

#[derive(Debug)]
struct UnisolatedJob {
    child: tokio::process::Child,
    pid: Option<u32>,
    _guard: Option<tokio::process::Child>,
    outputs: TcpListener,
    target: Arc<std::net::SocketAddr>,
    exit: Option<JobExit>,
}

impl UnisolatedJob {
    fn kill_group(&self, signal: rustix::process::Signal) {
        let Some(pid) = self
            .pid
            .and_then(|p| i32::try_from(p).ok())
            .and_then(rustix::process::Pid::from_raw)
        else {
            return;
        };
        // The job leads its own group, so its pid is the group id.
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

#[async_trait]
impl JobProcess for UnisolatedJob {
    fn dialer(&self) -> Arc<dyn JobDialer> {
        self.target.clone()
    }

    async fn accept_outputs(&mut self) -> std::io::Result<tokio::net::TcpStream> {
        Ok(self.outputs.accept().await?.0)
    }

    async fn wait(&mut self) -> std::io::Result<JobExit> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        let exit = JobExit::from_status(self.child.wait().await?);
        self.exit = Some(exit);
        Ok(exit)
    }

    async fn next_event(&mut self) -> JobEvent {
        if let Some(exit) = self.exit {
            return JobEvent::Exited(Ok(exit));
        }
        tokio::select! {
            status = self.child.wait() => JobEvent::Exited(status.map(|status| {
                let exit = JobExit::from_status(status);
                self.exit = Some(exit);
                exit
            })),
            Ok((stream, _)) = self.outputs.accept() => JobEvent::Outputs(stream),
        }
    }

    async fn stop(&mut self, grace: Duration) -> Option<JobExit> {
        if self.exit.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            self.kill_group(rustix::process::Signal::TERM);
            if tokio::time::timeout(grace, self.wait()).await.is_err() {
                self.kill_group(rustix::process::Signal::KILL);
            }
        }
        let exit = self.wait().await.ok();
        // Anything the job left behind in its group goes too.
        self.kill_group(rustix::process::Signal::KILL);
        exit
    }

    async fn remove(mut self: Box<Self>) {
        self.kill_group(rustix::process::Signal::KILL);
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
