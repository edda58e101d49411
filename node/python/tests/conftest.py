"""A real local horde network for the tests: `horde-testnet up` (facilitator, validator, miner
with the process runner, storage node) on 127.0.0.1, started once per test session.

The binaries come from `$HORDE_TESTNET_BIN`, `$HORDE_BIN` and `$HORDE_DEMO_JOB_BIN` when set,
else from the workspace's `target/debug`, built there first by `cargo test --workspace
--no-run` (a no-op after the workspace's own test build, as in `.ci/run`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

import horde

WORKSPACE = Path(__file__).resolve().parents[3]

# How long the network may take to come up (it prints its table when it is ready).
STARTUP_TIMEOUT_S = 180


def binary(name: str, env: str) -> str:
    given = os.environ.get(env)
    if given:
        return given
    target = Path(os.environ.get("CARGO_TARGET_DIR", WORKSPACE / "target"))
    path = target / "debug" / name
    if not path.is_file():
        subprocess.run(["cargo", "test", "--workspace", "--no-run", "--quiet"], cwd=WORKSPACE,
                       check=True)
    return str(path)


@dataclass
class Network:
    facilitator: str
    storage: str
    demo_job: str
    dir: Path

    def demo_spec(self, **overrides: object) -> horde.JobSpec:
        """The demo job (an HTTP/SSE/WebSocket server) on class `cpu`, logs to storage."""
        spec = horde.JobSpec(
            executor_class="cpu",
            program=self.demo_job,
            volumes=[horde.Volume(path="greeting.txt", inline="hello, horde")],
            logs_storage=self.storage,
        )
        for name, value in overrides.items():
            setattr(spec, name, value)
        return spec


def start_network(tmp: Path, miners: int = 1, executors: int = 1) -> tuple[subprocess.Popen[str], Network]:
    env = dict(os.environ)
    env["HORDE_BIN"] = binary("horde", "HORDE_BIN")
    demo_job = binary("horde-demo-job", "HORDE_DEMO_JOB_BIN")
    env["HORDE_DEMO_JOB_BIN"] = demo_job
    command = [binary("horde-testnet", "HORDE_TESTNET_BIN"), "up", "--dir", str(tmp),
               "--miners", str(miners), "--executors-per-miner", str(executors)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    facilitator: Optional[str] = None
    storage: Optional[str] = None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    for line in process.stdout:
        sys.stderr.write(line)
        fields = line.split()
        if len(fields) >= 4 and fields[1] == "storage":
            storage = f"{fields[2]}@{fields[3]}"
        match = re.match(r"facilitator: (\S+)", line)
        if match:
            facilitator = match.group(1)
        if line.startswith("ctrl-c stops it") or time.monotonic() > deadline:
            break
    if facilitator is None or storage is None:
        process.kill()
        raise RuntimeError("horde-testnet up did not print its facilitator and storage node")
    return process, Network(facilitator, storage, demo_job, tmp)


def stop_network(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    # Executors for the concurrent-jobs test (50 jobs) and the rest running beside it.
    process, net = start_network(tmp_path_factory.mktemp("testnet"), miners=2, executors=28)
    try:
        yield net
    finally:
        stop_network(process)


@pytest.fixture()
def client(network: Network) -> Iterator[horde.Client]:
    with horde.Client(horde.Key.generate(), network.facilitator) as client:
        yield client
