"""What the synchronous and asyncio APIs share: argument handling and the ``Response``."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from . import _native
from .spec import JobSpec, PathLike

Headers = Union[Mapping[str, str], Sequence[Tuple[str, str]], None]
Body = Union[bytes, bytearray, memoryview, str, None]


@dataclass(frozen=True)
class Response:
    """A job's whole answer to one request: ``status``, ``headers`` (in order, as sent),
    ``body`` (its exact bytes) and ``receipt`` (the job's signed receipt for the stream,
    already verified under the pinned job key)."""

    status: int
    headers: List[Tuple[str, str]]
    body: bytes
    receipt: _native.Receipt

    def header(self, name: str) -> Optional[str]:
        """The first header called ``name`` (case-insensitive)."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def headers_list(headers: Headers) -> List[Tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(str(k), str(v)) for k, v in headers]


def body_bytes(body: Body) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8")
    return bytes(body)


def account_key(key: Union[_native.Key, PathLike]) -> _native.Key:
    return key if isinstance(key, _native.Key) else _native.Key.load(key)


def spec_toml(spec: Union[JobSpec, PathLike]) -> str:
    if isinstance(spec, JobSpec):
        return spec.to_toml()
    with open(spec, encoding="utf-8") as file:
        return file.read()


class TempBlob:
    """Bytes to upload, in a temporary file (the Rust client hashes and sends files) removed on
    exit."""

    def __init__(self, data: Union[bytes, bytearray, memoryview]) -> None:
        handle, self.path = tempfile.mkstemp(prefix="horde-blob-")
        with os.fdopen(handle, "wb") as file:
            file.write(data)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *_: object) -> None:
        os.unlink(self.path)
