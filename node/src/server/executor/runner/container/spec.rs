//! The create request for a job's container, built from the [`Launch`] and the class policy:
//! a pure function, so every isolation setting is checked by a unit test on the request itself.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceMapping, DeviceRequest, HostConfig, HostConfigLogConfig, Mount,
    MountType, ResourcesUlimits,
};

use super::engine::EngineKind;
use super::gate;
use crate::server::executor::runner::{Gpus, Launch, RunnerError};

/// Where the job's volume directory appears inside the container (read-only).
pub const VOLUME_MOUNT: &str = "/horde/volume";
/// Where the job's output directory appears inside the container (read-write).
pub const OUTPUT_MOUNT: &str = "/horde/output";
/// The uid (and gid) a job runs as when its class names none: `nobody`.
pub const DEFAULT_UID: u32 = 65534;
/// The label naming the job a container runs.
pub const JOB_LABEL: &str = "horde.job";
/// The label naming the executor that started a container (`PID.STARTTIME`, see
/// [`super::guard::executor_identity`]): a container whose executor is gone is stale.
pub const EXECUTOR_LABEL: &str = "horde.executor";
/// The port the executor's outputs endpoint listens on inside each job's own network namespace
/// (`HORDE_EXECUTOR_URL`). Any port works there since the namespace is the job's alone; this
/// one is used unless the job's own port is this.
pub const OUTPUTS_PORT: u16 = 7077;
/// The mount options of the job's `/tmp` (a tmpfs), owned by the job's uid: the engine copies
/// the mode of the image's own `/tmp` onto the tmpfs (0755 root in some images), which `mode=`
/// does not override. Docker Engine takes `uid=`/`gid=`; Podman refuses those and chowns the
/// tmpfs to the container's user with `U`.
fn tmp_options(tmp_bytes: u64, uid: u32, engine: EngineKind) -> String {
    let owner = match engine {
        EngineKind::Docker => format!("uid={uid},gid={uid}"),
        EngineKind::Podman => "U".to_owned(),
    };
    format!("rw,nosuid,nodev,size={tmp_bytes},mode=1777,{owner}")
}

/// The CDI vendor/class of NVIDIA GPUs, as Podman names them.
const CDI_GPU: &str = "nvidia.com/gpu";

/// Everything the request needs besides the launch.
#[derive(Debug)]
pub(crate) struct ContainerPlan<'a> {
    /// The job.
    pub launch: &'a Launch,
    /// The image to run, by id (never by a name another load could retarget).
    pub image_id: &'a str,
    /// Which engine gets the request.
    pub engine: EngineKind,
    /// The value of [`EXECUTOR_LABEL`].
    pub executor: &'a str,
    /// The network mode: `none`, or the job's own network.
    pub network_mode: &'a str,
    /// The job's command (the image's entrypoint and command, or the job's arguments), run
    /// behind the start gate ([`super::gate`]).
    pub command: &'a [String],
    /// The directories the image declares `VOLUME`s: each gets a tmpfs like `/tmp` (its own
    /// `tmp_mb`, its pages counted in the job's memory) instead of a volume on the host's disk.
    pub image_volumes: &'a [String],
}

/// The outputs port inside the job's namespace: [`OUTPUTS_PORT`], or the next one when the job
/// uses that itself.
pub(crate) fn outputs_port(job_port: u16) -> u16 {
    if job_port == OUTPUTS_PORT {
        OUTPUTS_PORT + 1
    } else {
        OUTPUTS_PORT
    }
}

/// The job's environment: its own variables (minus any `HORDE_*` it tried to set), then ours.
fn environment(launch: &Launch) -> Vec<String> {
    let outputs = outputs_port(launch.port);
    let ours = [
        ("HORDE_JOB_PORT", launch.port.to_string()),
        ("HORDE_VOLUME_DIR", VOLUME_MOUNT.to_owned()),
        ("HORDE_OUTPUT_DIR", OUTPUT_MOUNT.to_owned()),
        ("HORDE_EXECUTOR_URL", format!("http://127.0.0.1:{outputs}")),
    ];
    launch
        .env
        .iter()
        .filter(|(key, _)| !key.starts_with("HORDE_") && !key.contains('='))
        .map(|(key, value)| format!("{key}={value}"))
        .chain(ours.iter().map(|(key, value)| format!("{key}={value}")))
        .collect()
}

/// What the engine is asked for GPUs: Docker gets device requests with the `gpu` capability
/// (count -1 = all); Podman's service ignores those, so it gets CDI device names.
fn gpu_devices(
    gpus: Option<Gpus>,
    engine: EngineKind,
) -> (Option<Vec<DeviceRequest>>, Option<Vec<DeviceMapping>>) {
    let Some(gpus) = gpus else {
        return (None, None);
    };
    match engine {
        EngineKind::Docker => {
            let count = match gpus {
                Gpus::All => -1,
                Gpus::Count(count) => i64::from(count),
            };
            let request = DeviceRequest {
                driver: Some(String::new()),
                count: Some(count),
                capabilities: Some(vec![vec!["gpu".to_owned()]]),
                ..DeviceRequest::default()
            };
            (Some(vec![request]), None)
        }
        EngineKind::Podman => {
            let names: Vec<String> = match gpus {
                Gpus::All => vec![format!("{CDI_GPU}=all")],
                Gpus::Count(count) => (0..count)
                    .map(|index| format!("{CDI_GPU}={index}"))
                    .collect(),
            };
            let devices = names
                .into_iter()
                .map(|name| DeviceMapping {
                    path_on_host: Some(name.clone()),
                    path_in_container: Some(name),
                    cgroup_permissions: Some("rwm".to_owned()),
                })
                .collect();
            (None, Some(devices))
        }
    }
}

fn to_i64(value: u64, what: &str) -> Result<i64, RunnerError> {
    i64::try_from(value).map_err(|_| RunnerError::Policy(format!("{what} {value} is too large")))
}

/// The create request for `plan`'s container.
pub(crate) fn create_body(plan: &ContainerPlan<'_>) -> Result<ContainerCreateBody, RunnerError> {
    let launch = plan.launch;
    let policy = &launch.policy;
    let uid = policy.uid.unwrap_or(DEFAULT_UID);
    if uid == 0 {
        return Err(RunnerError::Policy(
            "a job never runs as root: the class's uid must not be 0".into(),
        ));
    }
    let tmp_bytes = policy.tmp_limit();
    let memory = policy
        .memory_bytes
        .map(|bytes| to_i64(bytes, "memory"))
        .transpose()?;
    let nano_cpus = match policy.cpus {
        Some(cpus) if cpus.is_finite() && cpus > 0.0 && cpus <= 4096.0 => {
            // Bounded above, so the product fits in i64.
            #[expect(clippy::cast_possible_truncation, reason = "bounded to 4096e9")]
            Some((cpus * 1e9).round() as i64)
        }
        Some(cpus) => return Err(RunnerError::Policy(format!("cpus {cpus} is out of range"))),
        None => None,
    };
    let pids = Some(to_i64(policy.pids_limit(), "pids")?);
    // No file the job writes (in its output directory) grows past its disk limit.
    let file_size = to_i64(policy.disk_limit(), "disk")?;
    // And no core files: a job killed by SIGXFSZ (or anything else) leaves none on the host.
    let ulimits = [("fsize", file_size), ("core", 0)]
        .map(|(name, limit)| ResourcesUlimits {
            name: Some(name.to_owned()),
            soft: Some(limit),
            hard: Some(limit),
        })
        .to_vec();
    let (device_requests, devices) = gpu_devices(policy.gpus, plan.engine);
    let bind = |source: &str, target: &str, read_only: bool| -> Result<Mount, RunnerError> {
        let source = launch.job_dir.join(source);
        let source = source.to_str().ok_or_else(|| {
            RunnerError::Policy(format!("job directory {} is not UTF-8", source.display()))
        })?;
        Ok(Mount {
            target: Some(target.to_owned()),
            source: Some(source.to_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(read_only),
            ..Mount::default()
        })
    };
    let host_config = HostConfig {
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        readonly_rootfs: Some(true),
        tmpfs: Some(
            std::iter::once("/tmp")
                .chain(plan.image_volumes.iter().map(String::as_str))
                // Where the job's own directories are bound, the bind is what the job gets.
                .filter(|path| ![VOLUME_MOUNT, OUTPUT_MOUNT, gate::GATE_DIR].contains(path))
                .map(|path| (path.to_owned(), tmp_options(tmp_bytes, uid, plan.engine)))
                .collect(),
        ),
        mounts: Some(vec![
            bind("volume", VOLUME_MOUNT, true)?,
            bind("output", OUTPUT_MOUNT, false)?,
            bind(gate::HOST_DIR, gate::GATE_DIR, true)?,
        ]),
        memory,
        // Swap counted in the limit: a job over it is killed, not swapped.
        memory_swap: memory,
        nano_cpus,
        pids_limit: pids,
        ulimits: Some(ulimits),
        network_mode: Some(plan.network_mode.to_owned()),
        ipc_mode: Some("private".to_owned()),
        // A real init as pid 1: signals reach the job, orphans are reaped, and when it exits
        // the kernel ends every process of the container's pid namespace (`setsid` included).
        init: Some(true),
        // Output reaches the executor through attach; the engine keeps no copy of its own.
        log_config: Some(HostConfigLogConfig {
            typ: Some("none".to_owned()),
            config: None,
        }),
        device_requests,
        devices,
        privileged: Some(false),
        ..HostConfig::default()
    };
    let labels = HashMap::from([
        (JOB_LABEL.to_owned(), launch.job_id.to_string()),
        (EXECUTOR_LABEL.to_owned(), plan.executor.to_owned()),
    ]);
    Ok(ContainerCreateBody {
        image: Some(plan.image_id.to_owned()),
        // The engine runs entrypoint + cmd: the gate, then the job's command, whatever the
        // image's own entrypoint and command (they are in `plan.command` already).
        entrypoint: Some(gate::gated(plan.command)),
        cmd: Some(Vec::new()),
        env: Some(environment(launch)),
        user: Some(format!("{uid}:{uid}")),
        hostname: Some("job".to_owned()),
        labels: Some(labels),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(host_config),
        ..ContainerCreateBody::default()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::PathBuf;

    use horde_protocol::{JobId, Program};

    use super::*;
    use crate::server::executor::runner::{ClassPolicy, NetworkPolicy, Runtime};

    fn launch(policy: ClassPolicy) -> Launch {
        Launch {
            job_id: JobId([7; 16]),
            program: Program::Image {
                reference: "demo".into(),
            },
            args: vec!["serve".into()],
            env: vec![
                ("A".into(), "1".into()),
                ("HORDE_JOB_PORT".into(), "1".into()),
            ],
            job_dir: PathBuf::from("/srv/jobs/7"),
            port: 8080,
            policy,
        }
    }

    fn policy() -> ClassPolicy {
        ClassPolicy {
            runtime: Runtime::Container,
            network: NetworkPolicy::None,
            memory_bytes: None,
            cpus: None,
            pids: None,
            tmp_bytes: None,
            output_bytes: None,
            disk_bytes: None,
            gpus: None,
            uid: None,
            allow_unisolated: false,
        }
    }

    fn body(policy: ClassPolicy, engine: EngineKind) -> Result<ContainerCreateBody, RunnerError> {
        let launch = launch(policy);
        create_body(&ContainerPlan {
            image_volumes: &["/data".to_owned(), "/horde/output".to_owned()],
            launch: &launch,
            image_id: "sha256:abc",
            engine,
            executor: "42.7",
            network_mode: "none",
            command: &launch.args,
        })
    }

    #[test]
    fn the_request_isolates_the_job() {
        let body = body(policy(), EngineKind::Docker).unwrap();
        let host = body.host_config.clone().unwrap();
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges".to_owned()])
        );
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        // A class that names no limits still bounds processes and /tmp.
        assert_eq!(host.pids_limit, Some(4096));
        assert_eq!(host.init, Some(true));
        // And the size of any one file it writes (twice the default output limit), and cores.
        let ulimits = host.ulimits.clone().unwrap();
        assert_eq!(ulimits.len(), 2);
        assert_eq!(ulimits[0].name.as_deref(), Some("fsize"));
        assert_eq!(ulimits[0].hard, Some(8 << 30));
        assert_eq!(ulimits[0].soft, Some(8 << 30));
        assert_eq!(ulimits[1].name.as_deref(), Some("core"));
        assert_eq!((ulimits[1].soft, ulimits[1].hard), (Some(0), Some(0)));
        assert!(host.port_bindings.is_none() && host.publish_all_ports.is_none());
        let tmpfs = host.tmpfs.unwrap();
        assert_eq!(
            tmpfs["/tmp"],
            "rw,nosuid,nodev,size=67108864,mode=1777,uid=65534,gid=65534"
        );
        // The image's volumes are tmpfs too, but where the job's own directory is bound.
        assert_eq!(tmpfs["/data"], tmpfs["/tmp"]);
        assert_eq!(tmpfs.len(), 2, "{tmpfs:?}");
        let podman = self::body(policy(), EngineKind::Podman).unwrap();
        assert_eq!(
            podman.host_config.unwrap().tmpfs.unwrap()["/tmp"],
            "rw,nosuid,nodev,size=67108864,mode=1777,U"
        );
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts[0].source.as_deref(), Some("/srv/jobs/7/volume"));
        assert_eq!(mounts[0].target.as_deref(), Some(VOLUME_MOUNT));
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(mounts[1].target.as_deref(), Some(OUTPUT_MOUNT));
        assert_eq!(mounts[1].read_only, Some(false));
        // The start gate's directory, read-only.
        assert_eq!(mounts[2].source.as_deref(), Some("/srv/jobs/7/start"));
        assert_eq!(mounts[2].target.as_deref(), Some(gate::GATE_DIR));
        assert_eq!(mounts[2].read_only, Some(true));
        assert_eq!(body.user.as_deref(), Some("65534:65534"));
        assert_eq!(body.image.as_deref(), Some("sha256:abc"));
        // The gate, then the job's command; no image command appended.
        assert_eq!(
            body.entrypoint,
            Some(vec![
                gate::GATE_PROGRAM.to_owned(),
                gate::GATE_PIPE.to_owned(),
                "serve".to_owned()
            ])
        );
        assert_eq!(body.cmd, Some(Vec::new()));
        let labels = body.labels.unwrap();
        assert_eq!(labels[JOB_LABEL], JobId([7; 16]).to_string());
        assert_eq!(labels[EXECUTOR_LABEL], "42.7");
        // The job cannot set our variables.
        assert_eq!(
            body.env.unwrap(),
            [
                "A=1",
                "HORDE_JOB_PORT=8080",
                "HORDE_VOLUME_DIR=/horde/volume",
                "HORDE_OUTPUT_DIR=/horde/output",
                "HORDE_EXECUTOR_URL=http://127.0.0.1:7077",
            ]
        );
    }

    #[test]
    fn limits_come_from_the_class() {
        let mut limited = policy();
        limited.memory_bytes = Some(32 << 20);
        limited.cpus = Some(1.5);
        limited.pids = Some(64);
        limited.tmp_bytes = Some(1 << 20);
        limited.uid = Some(1234);
        let body = body(limited, EngineKind::Docker).unwrap();
        let host = body.host_config.unwrap();
        assert_eq!(host.memory, Some(32 << 20));
        assert_eq!(host.memory_swap, Some(32 << 20));
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.pids_limit, Some(64));
        assert!(host.tmpfs.unwrap()["/tmp"].contains("size=1048576"));
        assert_eq!(body.user.as_deref(), Some("1234:1234"));

        let mut root = policy();
        root.uid = Some(0);
        assert!(matches!(
            super::tests::body(root, EngineKind::Docker),
            Err(RunnerError::Policy(_))
        ));
        let mut nan = policy();
        nan.cpus = Some(f64::NAN);
        assert!(matches!(
            super::tests::body(nan, EngineKind::Docker),
            Err(RunnerError::Policy(_))
        ));
    }

    #[test]
    fn gpus_are_device_requests_for_docker_and_cdi_names_for_podman() {
        let mut all = policy();
        all.gpus = Some(Gpus::All);
        let host = body(all.clone(), EngineKind::Docker)
            .unwrap()
            .host_config
            .unwrap();
        let requests = host.device_requests.unwrap();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].count, Some(-1));
        assert_eq!(requests[0].capabilities, Some(vec![vec!["gpu".to_owned()]]));
        assert!(host.devices.is_none());

        let mut two = policy();
        two.gpus = Some(Gpus::Count(2));
        let host = body(two.clone(), EngineKind::Docker)
            .unwrap()
            .host_config
            .unwrap();
        assert_eq!(host.device_requests.unwrap()[0].count, Some(2));

        let host = body(all, EngineKind::Podman).unwrap().host_config.unwrap();
        assert!(host.device_requests.is_none());
        let devices = host.devices.unwrap();
        assert_eq!(
            devices[0].path_on_host.as_deref(),
            Some("nvidia.com/gpu=all")
        );
        let host = body(two, EngineKind::Podman).unwrap().host_config.unwrap();
        let names: Vec<_> = host
            .devices
            .unwrap()
            .into_iter()
            .filter_map(|device| device.path_on_host)
            .collect();
        assert_eq!(names, ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]);

        // No GPUs asked for: neither.
        let host = body(policy(), EngineKind::Podman)
            .unwrap()
            .host_config
            .unwrap();
        assert!(host.device_requests.is_none() && host.devices.is_none());
    }
}
