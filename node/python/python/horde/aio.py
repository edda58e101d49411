"""The asyncio API: the same calls as ``horde`` with ``await``. No call blocks the event loop:
each runs on the SDK's own runtime and completes an asyncio future; cancelling the awaiting task
cancels the operation.

>>> async with horde.aio.Client(key, facilitator) as client:
...     job = await client.submit(spec)
...     async for status in job.statuses(): ...
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import AsyncIterator, Callable, Optional, Sequence, Type, Union

from . import _native
from ._common import Body, Headers, Response, TempBlob, account_key, body_bytes, headers_list, spec_toml
from ._native import Endpoint, Forward, Key, Receipt, ResponseStream, Status
from .spec import JobSpec, PathLike, Upload, Volume, volume_list_toml

Progress = Callable[[int, int], None]


class AsyncForward:
    """A local port tunnelled to the job; ``async with`` closes it."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.url: str = forward.url
        self.port: int = forward.port

    @property
    def receipts(self) -> int:
        """Verified receipts of forwarded connections that have ended."""
        return self.forward.receipts

    def close(self) -> None:
        self.forward.close()

    async def __aenter__(self) -> "AsyncForward":
        return self

    async def __aexit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                        traceback: Optional[TracebackType]) -> None:
        self.close()


class Job:
    """A job on the network (asyncio)."""

    def __init__(self, native: _native.Job) -> None:
        self._job = native

    @property
    def job_id(self) -> str:
        return self._job.job_id

    @property
    def client_key(self) -> Optional[Key]:
        return self._job.client_key

    async def statuses(self, timeout: Optional[float] = None) -> AsyncIterator[Status]:
        """Every pushed status in order; ends after the terminal one."""
        index = 0
        while True:
            status = await self._job.next_status_async(index, timeout)
            if status is None:
                return
            yield status
            index += 1

    def history(self) -> list[Status]:
        return self._job.history()

    async def wait_for(self, name: str, timeout: Optional[float] = None) -> Status:
        return await self._job.wait_for_async(name, timeout)

    async def wait_for_endpoint(self, timeout: Optional[float] = None) -> Endpoint:
        return await self._job.wait_for_endpoint_async(timeout)

    async def request(self, method: str, path: str, body: Body = None, headers: Headers = None,
                      timeout: Optional[float] = None) -> Response:
        status, head, data, receipt = await self._job.request_raw_async(
            method, path, body_bytes(body), headers_list(headers), timeout)
        return Response(status, head, data, receipt)

    async def stream(self, method: str, path: str, body: Body = None,
                     headers: Headers = None) -> ResponseStream:
        """Use ``await stream.read_async()`` and ``await stream.finish_async()``."""
        return await self._job.stream_async(method, path, body_bytes(body), headers_list(headers))

    async def forward(self, port: int = 0) -> AsyncForward:
        return AsyncForward(await self._job.forward_async(port))

    async def send_volumes(self, volume_msg_id: int, fetch: Sequence[Volume] = (),
                           upload: Sequence[Upload] = ()) -> None:
        await self._job.send_volumes_toml_async(volume_list_toml(volume_msg_id, fetch, upload))

    async def terminate(self) -> None:
        await self._job.terminate_async()

    async def wait(self, timeout: Optional[float] = None) -> Status:
        return await self._job.wait_async(timeout)

    async def report(self, receipt: Receipt, details: str) -> str:
        return await self._job.report_async(receipt, details)

    async def close(self) -> None:
        await self._job.close_async()

    def __repr__(self) -> str:
        return repr(self._job)


class Client:
    """A client of one facilitator (asyncio)."""

    def __init__(self, account_key_or_path: Union[Key, PathLike], facilitator: str) -> None:
        self._client = _native.Client(account_key(account_key_or_path), facilitator)

    @property
    def account(self) -> str:
        return self._client.account

    async def submit(self, spec: Union[JobSpec, PathLike], timeout: Optional[float] = None) -> Job:
        return Job(await self._client.submit_toml_async(spec_toml(spec), timeout))

    async def attach(self, job_id: str, client_key: Optional[Key] = None,
                     timeout: Optional[float] = None) -> Job:
        return Job(await self._client.attach_async(job_id, client_key, timeout))

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *_: object) -> None:
        pass


async def blob_put(storage: str, data: Union[bytes, bytearray, memoryview, PathLike],
                   progress: Optional[Progress] = None, key: Optional[Key] = None) -> str:
    if isinstance(data, (bytes, bytearray, memoryview)):
        with TempBlob(data) as path:
            return await _native.blob_put_async(storage, path, progress, key)
    return await _native.blob_put_async(storage, os.fspath(data), progress, key)


async def blob_get(storage: str, hash: str, path: Optional[PathLike] = None,
                   progress: Optional[Progress] = None, max_size: Optional[int] = None,
                   key: Optional[Key] = None) -> Optional[bytes]:
    target = None if path is None else os.fspath(path)
    if max_size is None:
        return await _native.blob_get_async(storage, hash, target, progress, key=key)
    return await _native.blob_get_async(storage, hash, target, progress, max_size, key)
