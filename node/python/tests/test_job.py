"""A streaming job end to end from Python, through a real local network: the demo job's HTTP
echo with its receipt, SSE read incrementally, a WebSocket through `forward()`, a volume list,
an upload, terminate and the uploaded logs; re-attaching by id; lifetimes across handles,
interpreters and fork."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from websockets.sync.client import connect as websocket_connect

import horde

# The statuses a demo job goes through when it is given a volume list, uploads one output and
# is terminated (the Rust demo's list).
DEMO_STATUSES = ["Received", "Assigned", "Accepted", "ExecutorReady", "EndpointReady",
                 "VolumesFetched", "UploadDone", "Completed"]


def test_demo_job_end_to_end(network, client):
    job = client.submit(network.demo_spec())
    endpoint = job.wait_for_endpoint(timeout=60)
    assert ":" in endpoint.address and endpoint.job_key and endpoint.miner

    # HTTP with a header of ours, the exact body back, and a receipt verified under the job key.
    payload = bytes(range(256)) * 3
    response = job.request("POST", "/echo", payload, headers={"X-Test": "1"})
    assert response.status == 200
    assert response.body == payload
    assert response.receipt.job_id == job.job_id
    assert response.receipt.bytes_out >= len(payload) and response.receipt.bytes_in >= len(payload)
    assert horde.Receipt.from_bytes(response.receipt.to_bytes()).stream == response.receipt.stream

    # SSE, read as it arrives: the first event comes long before the last is written.
    started = time.monotonic()
    stream = job.stream("GET", "/stream?n=5&delay_ms=300")
    assert stream.status == 200
    assert dict((k.lower(), v) for k, v in stream.headers)["content-type"].startswith("text/event-stream")
    first = stream.read()
    first_at = time.monotonic() - started
    assert first is not None and b"data: token-0" in first
    rest = b""
    while (chunk := stream.read()) is not None:
        rest += chunk
    total = time.monotonic() - started
    assert (first + rest).count(b"data: token-") == 5 and b"[DONE]" in rest
    assert first_at < total - 0.9, (first_at, total)
    assert stream.finish().bytes_out > 0

    # A WebSocket through a local forward, with the `websockets` package.
    with job.forward() as forward:
        assert forward.url.startswith("http://127.0.0.1:")
        with websocket_connect(forward.url.replace("http", "ws", 1) + "/ws") as ws:
            ws.send("ping over QUIC")
            assert ws.recv(timeout=10) == "ping over QUIC"
            ws.send(b"\x00\x01binary")
            assert ws.recv(timeout=10) == b"\x00\x01binary"
        deadline = time.monotonic() + 10
        while forward.receipts < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert forward.receipts >= 1

    # A volume list mid-session (the job reads it), then an output the job writes, uploaded.
    job.send_volumes(1, fetch=[horde.Volume("later.txt", inline="fetched mid-session")],
                     upload=[horde.Upload("answer.txt", storage=network.storage)])
    assert job.wait_for("VolumesFetched", timeout=30).volume_msg_id == 1
    assert job.request("GET", "/volume?path=later.txt").body == b"fetched mid-session"
    assert job.request("GET", "/volume?path=greeting.txt").body == b"hello, horde"
    assert job.request("POST", "/output?path=answer.txt", b"42").status == 200
    uploaded = job.wait_for("UploadDone", timeout=30)
    [answer] = [o for o in uploaded.outputs if o.path == "answer.txt"]
    assert answer.size == 2 and answer.storage == network.storage
    assert horde.blob_get(network.storage, answer.hash) == b"42"

    # Terminate; the final status carries the logs, uploaded to the storage node.
    job.terminate()
    final = job.wait(timeout=60)
    assert final.name == "Completed" and final.terminal and "terminated" in final.text
    assert [s.name for s in job.statuses()] == DEMO_STATUSES
    [stdout] = [o for o in final.outputs if o.path == "stdout"]
    logs = horde.blob_get(network.storage, stdout.hash)
    assert b"/echo" in logs and b"/stream" in logs, logs
    assert final.stdout_tail and "/echo" in final.stdout_tail


def test_a_dropped_handle_leaves_the_job_running_and_it_is_attached_again(network, client):
    job = client.submit(network.demo_spec())
    job.wait_for_endpoint(timeout=60)
    job_id, key = job.job_id, job.client_key
    assert key is not None
    del job
    again = client.attach(job_id, client_key=key)
    # The history is replayed to the new handle, from the first status.
    assert next(again.statuses(timeout=30)).name == "Received"
    again.wait_for_endpoint(timeout=30)
    assert again.request("POST", "/echo", b"still here").body == b"still here"
    again.terminate()
    assert again.wait(timeout=60).name == "Completed"


def test_a_job_outlives_the_interpreter_that_submitted_it(network, tmp_path):
    account = horde.Key.generate()
    account.save(tmp_path / "account.json")
    script = textwrap.dedent(f"""
        import horde
        client = horde.Client({str(tmp_path / 'account.json')!r}, {network.facilitator!r})
        job = client.submit(horde.JobSpec(executor_class="cpu", program={network.demo_job!r}))
        job.wait_for_endpoint(timeout=60)
        job.client_key.save({str(tmp_path / 'job-key.json')!r})
        print(job.job_id)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    job_id = done.stdout.strip()
    client = horde.Client(account, network.facilitator)
    job = client.attach(job_id, client_key=horde.Key.load(tmp_path / "job-key.json"))
    assert job.request("POST", "/echo", b"after exit").body == b"after exit"
    job.terminate()
    assert job.wait(timeout=60).name == "Completed"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_does_not_share_the_parents_connections(network, client):
    job = client.submit(network.demo_spec())
    job.wait_for_endpoint(timeout=60)
    pid = os.fork()
    if pid == 0:  # the child: the parent's objects refuse; a new client works
        code = 1
        try:
            job.request("POST", "/echo", b"x")
        except horde.HordeError as error:
            if "fork" in str(error):
                fresh = horde.Client(horde.Key.generate(), network.facilitator)
                try:
                    fresh.attach("00" * 16, timeout=30).wait(timeout=30)
                except horde.RejectedError:
                    code = 0
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert job.request("POST", "/echo", b"parent").body == b"parent"
    job.terminate()
    job.wait(timeout=60)
