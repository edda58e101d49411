"""horde: rent compute for streaming jobs. The synchronous API (``horde.aio`` has the same with
``await``); both run the Rust client (QUIC, TLS key pinning, signatures, receipt and blob
checks) and release the GIL while they wait. Ctrl-C cancels a blocking call cleanly.

>>> key = horde.Key.generate()
>>> with horde.Client(key, "HOTKEY@127.0.0.1:7000") as client:
...     job = client.submit(horde.JobSpec(executor_class="cpu", program="/usr/bin/my-server"))
...     job.wait_for_endpoint()
...     response = job.request("GET", "/health")   # exact bytes + verified receipt
...     job.terminate(); job.wait()

Lifetimes: a ``Job`` handle only follows its job. Dropping it (or exiting the interpreter) leaves
the job running until ``terminate()`` or its deadline; ``Client.attach(job_id, client_key)``
follows it again. Objects are bound to the process that made them: after ``fork()`` the child
makes its own ``Client`` (the parent's connections are not shared).
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Sequence, Union

from . import _native
from ._common import Body, Headers, Response, TempBlob, account_key, body_bytes, headers_list, spec_toml
from ._native import (
    ConnectionLostError,
    Endpoint,
    Forward,
    HordeError,
    HordeFailedError,
    IntegrityError,
    InvalidSpecError,
    JobEndedError,
    JobFailedError,
    Key,
    KeyFileError,
    Output,
    ProtocolError,
    Receipt,
    RejectedError,
    ResponseStream,
    Status,
    TimedOutError,
    TooManyConnectionsError,
    UnreachableError,
)
from .spec import JobSpec, PathLike, Upload, Volume, volume_list_toml

__all__ = [
    "Client", "Job", "JobSpec", "Volume", "Upload", "Key", "Status", "Output", "Endpoint",
    "Receipt", "Response", "ResponseStream", "Forward", "blob_put", "blob_get",
    "HordeError", "JobEndedError", "RejectedError", "JobFailedError", "HordeFailedError",
    "UnreachableError", "TooManyConnectionsError", "TimedOutError", "IntegrityError",
    "InvalidSpecError", "ConnectionLostError", "ProtocolError", "KeyFileError",
]

Progress = Callable[[int, int], None]


class Job:
    """A job on the network (from ``Client.submit`` or ``Client.attach``)."""

    def __init__(self, native: _native.Job) -> None:
        self._job = native

    @property
    def job_id(self) -> str:
        """The job id (32 hex digits)."""
        return self._job.job_id

    @property
    def client_key(self) -> Optional[Key]:
        """The per-job client key: keep it (``key.save(path)``) to attach again later."""
        return self._job.client_key

    def statuses(self, timeout: Optional[float] = None) -> Iterator[Status]:
        """Every pushed status in order, from the first, waiting for each; ends after the
        terminal one. ``timeout`` bounds the wait for each."""
        index = 0
        while True:
            status = self._job.next_status(index, timeout)
            if status is None:
                return
            yield status
            index += 1

    def history(self) -> list[Status]:
        """The statuses received so far."""
        return self._job.history()

    def wait_for(self, name: str, timeout: Optional[float] = None) -> Status:
        """The first status of kind ``name`` (e.g. ``"VolumesFetched"``), waiting for it."""
        return self._job.wait_for(name, timeout)

    def wait_for_endpoint(self, timeout: Optional[float] = None) -> Endpoint:
        """Waits until the job serves; returns its endpoint record, verified against the
        assigned miner."""
        return self._job.wait_for_endpoint(timeout)

    def request(self, method: str, path: str, body: Body = None, headers: Headers = None,
                timeout: Optional[float] = None) -> Response:
        """One HTTP request through the job's tunnel: status, headers, the body's exact bytes
        and the job's verified receipt."""
        status, head, data, receipt = self._job.request_raw(
            method, path, body_bytes(body), headers_list(headers), timeout)
        return Response(status, head, data, receipt)

    def stream(self, method: str, path: str, body: Body = None,
               headers: Headers = None) -> ResponseStream:
        """One HTTP request whose body is read as it arrives (``read()``), then ``finish()``
        for the verified receipt."""
        return self._job.stream(method, path, body_bytes(body), headers_list(headers))

    def forward(self, port: int = 0) -> Forward:
        """A local port (``with job.forward() as fwd: fwd.url``) tunnelled to the job, for any
        HTTP or WebSocket library."""
        return self._job.forward(port)

    def send_volumes(self, volume_msg_id: int, fetch: Sequence[Volume] = (),
                     upload: Sequence[Upload] = ()) -> None:
        """Sends a signed volume list; ``wait_for("VolumesFetched")`` sees it fetched."""
        self._job.send_volumes_toml(volume_list_toml(volume_msg_id, fetch, upload))

    def terminate(self) -> None:
        """Asks for the job to end."""
        self._job.terminate()

    def wait(self, timeout: Optional[float] = None) -> Status:
        """The final status of a completed job; a ``JobEndedError`` subclass otherwise."""
        return self._job.wait(timeout)

    def report(self, receipt: Receipt, details: str) -> str:
        """Reports the job's miner for a wrong answer (``receipt``: the disputed stream's);
        returns the facilitator's verdict."""
        return self._job.report(receipt, details)

    def close(self) -> None:
        """Closes the connection to the job (the job keeps running)."""
        self._job.close()

    def __repr__(self) -> str:
        return repr(self._job)


class Client:
    """A client of one facilitator (``HOTKEY@IP:PORT``) with an account key (a ``Key`` or a key
    file path). Its jobs share one connection to the facilitator."""

    def __init__(self, account_key_or_path: Union[Key, PathLike], facilitator: str) -> None:
        self._client = _native.Client(account_key(account_key_or_path), facilitator)

    @property
    def account(self) -> str:
        """The account key's SS58 address."""
        return self._client.account

    def submit(self, spec: Union[JobSpec, PathLike], timeout: Optional[float] = None) -> Job:
        """Signs and submits a job (a ``JobSpec`` or the path of a ``job.toml``)."""
        return Job(self._client.submit_toml(spec_toml(spec), timeout))

    def attach(self, job_id: str, client_key: Optional[Key] = None,
               timeout: Optional[float] = None) -> Job:
        """Follows a job of this account again by id (give its ``client_key`` to reach its
        endpoint)."""
        return Job(self._client.attach(job_id, client_key, timeout))

    def close(self) -> None:
        """Closes the connection to the facilitator (jobs keep running)."""
        self._client.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def blob_put(storage: str, data: Union[bytes, bytearray, memoryview, PathLike],
             progress: Optional[Progress] = None, key: Optional[Key] = None) -> str:
    """Uploads bytes or a file to a storage node; returns the BLAKE3 hash (hex)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        with TempBlob(data) as path:
            return _native.blob_put(storage, path, progress, key)
    return _native.blob_put(storage, os.fspath(data), progress, key)


def blob_get(storage: str, hash: str, path: Optional[PathLike] = None,
             progress: Optional[Progress] = None, max_size: Optional[int] = None,
             key: Optional[Key] = None) -> Optional[bytes]:
    """Downloads a blob, verified against ``hash``: into ``path`` (returns ``None``) or into
    memory (returns the bytes). A corrupted blob raises ``IntegrityError``."""
    target = None if path is None else os.fspath(path)
    if max_size is None:
        return _native.blob_get(storage, hash, target, progress, key=key)
    return _native.blob_get(storage, hash, target, progress, max_size, key)
