"""Every typed exception made to happen, against the real network (or, for an unreachable
node, an address where nothing listens), and Ctrl-C cancelling a blocking call."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest

import horde
from conftest import binary, start_network, stop_network


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_hierarchy_has_one_base():
    for kind in (horde.RejectedError, horde.JobFailedError, horde.HordeFailedError):
        assert issubclass(kind, horde.JobEndedError)
    for kind in (horde.JobEndedError, horde.UnreachableError, horde.TooManyConnectionsError,
                 horde.TimedOutError, horde.IntegrityError, horde.InvalidSpecError,
                 horde.ConnectionLostError, horde.ProtocolError, horde.KeyFileError):
        assert issubclass(kind, horde.HordeError)


def test_key_files_follow_the_0600_rule(tmp_path):
    key = horde.Key.generate()
    path = tmp_path / "key.json"
    key.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert horde.Key.load(path) == key and horde.Key.load(path).ss58 == key.ss58
    assert key.ss58.startswith("5") and len(key.public_hex) == 64
    with pytest.raises(horde.KeyFileError, match="already exists"):
        key.save(path)
    os.chmod(path, 0o644)
    with pytest.raises(horde.KeyFileError, match="chmod 600"):
        horde.Key.load(path)


def test_rejected_with_its_reason(client):
    job = client.submit(horde.JobSpec(executor_class="no-such-class", program="/bin/true"))
    with pytest.raises(horde.RejectedError) as raised:
        job.wait(timeout=60)
    assert raised.value.reason == "no miner has an executor of this class"
    with pytest.raises(horde.RejectedError):
        job.wait_for_endpoint(timeout=5)


def test_job_failed_with_stage_and_reason(network, client):
    spec = network.demo_spec(args=["--fail-health"], deadlines={"readiness_ms": 2000})
    job = client.submit(spec)
    with pytest.raises(horde.JobFailedError) as raised:
        job.wait_for_endpoint(timeout=60)
    assert raised.value.stage == "Readiness", raised.value
    assert raised.value.reason == "its deadline passed"


def test_invalid_spec_and_bad_requests(network, client):
    with pytest.raises(horde.InvalidSpecError, match="program"):
        client.submit(horde.JobSpec(executor_class="cpu", program="/a", image="b"))
    job = client.submit(network.demo_spec())
    job.wait_for_endpoint(timeout=60)
    with pytest.raises(horde.ProtocolError, match="header"):
        job.request("GET", "/health", headers={"Content-Length": "5"})
    with pytest.raises(horde.TimedOutError):
        job.wait_for("NeverSent", timeout=0.2)
    job.close()
    with pytest.raises(horde.ConnectionLostError):
        job.request("GET", "/health")
    job.terminate()
    job.wait(timeout=60)


def test_unreachable_storage_node():
    nobody = f"{horde.Key.generate().ss58}@127.0.0.1:{free_udp_port()}"
    with pytest.raises((horde.UnreachableError, horde.TimedOutError)):
        horde.blob_get(nobody, "00" * 32)


def test_unreachable_facilitator():
    nobody = f"{horde.Key.generate().ss58}@127.0.0.1:{free_udp_port()}"
    client = horde.Client(horde.Key.generate(), nobody)
    with pytest.raises((horde.UnreachableError, horde.TimedOutError)):
        client.submit(horde.JobSpec(executor_class="cpu", program="/bin/true"), timeout=60)


def test_too_many_connections_from_one_key(tmp_path):
    """A facilitator of its own whose per-key cap (2) is below the per-address share of unknown
    keys (8; `horde-testnet up`'s facilitator admits 16 per key, so loopback clients hit the
    address share first, a refusal at the handshake: `UnreachableError`)."""
    key = horde.Key.generate()
    key.save(tmp_path / "hotkey.json")
    port = free_udp_port()
    (tmp_path / "node.toml").write_text(
        'role = "facilitator"\nkey_file = "hotkey.json"\n'
        f'listen = "127.0.0.1:{port}"\nmax_connections = 128\nmax_connections_per_peer = 2\n'
        'data_dir = "data"\n')
    horde_bin = binary("horde", "HORDE_BIN")
    with open(tmp_path / "node.log", "wb") as log:
        node = subprocess.Popen([horde_bin, "node", "--config", str(tmp_path / "node.toml")],
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        facilitator = f"{key.ss58}@127.0.0.1:{port}"
        account = horde.Key.generate()
        clients = []
        deadline = time.monotonic() + 30
        while True:  # the node is up once a client is answered (a refused unknown job id)
            first = horde.Client(account, facilitator)
            try:
                first.attach("00" * 16, timeout=5)
                break
            except (horde.TimedOutError, horde.UnreachableError):
                assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()
        clients.append(first)
        with pytest.raises(horde.TooManyConnectionsError):
            for _ in range(4):
                client = horde.Client(account, facilitator)
                clients.append(client)
                client.attach("00" * 16, timeout=30)
        assert len(clients) == 3, len(clients)
    finally:
        node.terminate()
        node.wait(timeout=30)


def test_ctrl_c_cancels_a_blocking_call(network, client):
    job = client.submit(network.demo_spec())
    job.wait_for_endpoint(timeout=60)
    # Python installs its KeyboardInterrupt handler only when SIGINT is not ignored at start; a
    # process started in the background by a shell without job control (a CI runner, `cmd &`
    # in a script) inherits SIGINT ignored. What is tested is that a blocking call runs Python's
    # handler, so the test sets it, whatever the process inherited.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            job.wait_for("NeverSent")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 3
    # The handle still works after the cancelled call.
    assert job.request("POST", "/echo", b"after ctrl-c").body == b"after ctrl-c"
    job.terminate()
    job.wait(timeout=60)


def test_report_then_horde_failed_names_the_hop(tmp_path):
    """On a network of its own (a report excludes the miner): a miner report with the job's
    receipt as evidence is accepted; then a killed validator: the facilitator fails the job and
    says so (the Rust flow test's fault)."""
    process, net = start_network(tmp_path)
    try:
        client = horde.Client(horde.Key.generate(), net.facilitator)
        job = client.submit(net.demo_spec())
        job.wait_for_endpoint(timeout=60)
        response = job.request("POST", "/echo", b"disputed")
        verdict = job.report(response.receipt, "a wrong answer")
        assert verdict.startswith("Accepted"), verdict
        pids = (tmp_path / "pids").read_text().split()
        validator = [p for p in pids if "validator" in _cmdline(p)]
        assert len(validator) == 1, pids
        os.kill(int(validator[0]), signal.SIGKILL)
        with pytest.raises(horde.HordeFailedError) as raised:
            job.wait(timeout=60)
        assert raised.value.role == "facilitator" and "validator" in raised.value.reason
    finally:
        stop_network(process)


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
