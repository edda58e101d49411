#!/usr/bin/env python3
"""The Python SDK against the Rust client, in the same run on the same network:

1. Request round trip (`POST /echo`, 64 bytes, a new tunnel stream each, receipt verified):
   `horde.Job.request` (sync API) against the Rust client (`sdk-request-rtt`, attached to the
   same job), in alternating rounds. Target: Python median <= 1.3x Rust.
2. 1 GiB blob get into a file: `horde.blob_get(storage, hash, path)` against `horde blob get`,
   alternating rounds. Target: Python rate >= 0.9x the CLI's.

Needs the `horde` package installed (`pip install ./node/python`) and release binaries:
`cargo build --release -p horde-testnet -p horde-node -p horde-benches --bins`.

    python3 benches/python_sdk.py [--rounds 3] [--requests 200] [--blob-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import horde

WORKSPACE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(WORKSPACE / "node" / "python" / "tests"))
from conftest import start_network, stop_network  # noqa: E402


def release(name: str) -> str:
    return str(WORKSPACE / "target" / "release" / name)


def python_rtt(job: horde.Job, requests: int) -> float:
    body = b"x" * 64
    for _ in range(10):
        job.request("POST", "/echo", body)
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = job.request("POST", "/echo", body)
        times.append(time.perf_counter() - started)
        assert response.body == body
    return statistics.median(times) * 1e6


def rust_rtt(net, account: Path, job: horde.Job, key: Path, requests: int) -> float:
    out = subprocess.run(
        [release("sdk-request-rtt"), "--facilitator", net.facilitator, "--account", str(account),
         "--job", job.job_id, "--client-key", str(key), "--requests", str(requests)],
        check=True, capture_output=True, text=True).stdout.split()
    return float(out[out.index("median_us") + 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--blob-mib", type=int, default=1024)
    args = parser.parse_args()
    for name, env in [("horde", "HORDE_BIN"), ("horde-demo-job", "HORDE_DEMO_JOB_BIN"),
                      ("horde-testnet", "HORDE_TESTNET_BIN")]:
        os.environ.setdefault(env, release(name))

    with tempfile.TemporaryDirectory(prefix="horde-pybench-") as tmp:
        tmp_path = Path(tmp)
        process, net = start_network(tmp_path / "net")
        try:
            account = horde.Key.generate()
            account.save(tmp_path / "account.json")
            client = horde.Client(account, net.facilitator)
            job = client.submit(net.demo_spec())
            job.wait_for_endpoint(timeout=60)
            assert job.client_key is not None
            job.client_key.save(tmp_path / "job-key.json")

            py, rs = [], []
            for _ in range(args.rounds):
                rs.append(rust_rtt(net, tmp_path / "account.json", job, tmp_path / "job-key.json",
                                   args.requests))
                py.append(python_rtt(job, args.requests))
            ratio = statistics.median(py) / statistics.median(rs)
            print(f"request round trip, median of {args.rounds} rounds x {args.requests}: "
                  f"Python {statistics.median(py):.0f} us, Rust {statistics.median(rs):.0f} us, "
                  f"ratio {ratio:.2f} (target <= 1.3)")
            job.terminate()
            job.wait(timeout=60)

            blob = tmp_path / "blob.bin"
            with open(blob, "wb") as file:
                chunk = os.urandom(1 << 20)
                for _ in range(args.blob_mib):
                    file.write(chunk)
            size = blob.stat().st_size
            hash = horde.blob_put(net.storage, blob)
            blob.unlink()
            py_rates, cli_rates = [], []
            for round in range(args.rounds):
                target = tmp_path / f"cli-{round}.bin"
                started = time.perf_counter()
                subprocess.run([release("horde"), "blob", "get", hash, "-o", str(target),
                                "--storage", net.storage], check=True, capture_output=True)
                cli_rates.append(size / (time.perf_counter() - started) / 1e6)
                target.unlink()
                target = tmp_path / f"py-{round}.bin"
                started = time.perf_counter()
                horde.blob_get(net.storage, hash, target)
                py_rates.append(size / (time.perf_counter() - started) / 1e6)
                target.unlink()
            ratio = statistics.median(py_rates) / statistics.median(cli_rates)
            print(f"{args.blob_mib} MiB blob get into a file, median of {args.rounds}: "
                  f"Python {statistics.median(py_rates):.0f} MB/s, CLI "
                  f"{statistics.median(cli_rates):.0f} MB/s, ratio {ratio:.2f} (target >= 0.9)")
        finally:
            stop_network(process)


if __name__ == "__main__":
    main()
