"""Job specs and volume lists built in Python: the same fields as ``job.toml`` and the volume
list file of ``horde job volumes``. They are handed to the Rust client as TOML, which checks
every field (errors name the field) exactly as for the command line."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older interpreters only
    import tomli as tomllib

PathLike = Union[str, "os.PathLike[str]"]


def _value(value: Any) -> str:
    """One TOML value: strings as basic strings (JSON escapes are TOML escapes), lists, tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _table(items: Mapping[str, Any]) -> str:
    return "".join(f"{key} = {_value(value)}\n" for key, value in items.items() if value is not None)


@dataclass
class Volume:
    """A volume: a file placed at ``path`` (relative) in the job's volume directory, from exactly
    one of ``inline`` text, a ``url`` (optionally with ``blake3`` and ``size``) or a ``blob``
    hash on a ``storage`` node (with ``size``)."""

    path: str
    inline: Optional[str] = None
    url: Optional[str] = None
    blake3: Optional[str] = None
    size: Optional[int] = None
    blob: Optional[str] = None
    storage: Optional[str] = None

    def _fields(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("path", "inline", "url", "blake3", "size", "blob", "storage")}


@dataclass
class Upload:
    """An output: the file at ``path`` in the job's output directory, uploaded to a ``storage``
    node (``HOTKEY@IP:PORT``) or PUT to ``put_url`` with ``headers``."""

    path: str
    storage: Optional[str] = None
    put_url: Optional[str] = None
    headers: Dict[str, str] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"path": self.path, "storage": self.storage, "put_url": self.put_url,
                "headers": self.headers or None}


@dataclass
class JobSpec:
    """A job spec with the fields of ``job.toml``: what to run (``program`` path, container
    ``image``, or ``image_blob`` = ``{hash, size, storage}``), on which ``executor_class``, with
    its ``args``, ``env``, readiness probe, staged ``deadlines`` (``reservation_ms``,
    ``executor_startup_ms``, ``volume_download_ms``, ``readiness_ms``, ``execution_ms``,
    ``upload_ms``), ``volumes``, ``uploads`` and where its logs go (``logs_storage``)."""

    executor_class: str
    program: Optional[str] = None
    image: Optional[str] = None
    image_blob: Optional[Dict[str, Any]] = None
    args: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)
    readiness_http: Optional[str] = None
    readiness_tcp: Optional[bool] = None
    deadlines: Dict[str, int] = field(default_factory=dict)
    volumes: List[Volume] = field(default_factory=list)
    uploads: List[Upload] = field(default_factory=list)
    logs_storage: Optional[str] = None
    on_trusted_miner: bool = False
    expires_in_secs: Optional[int] = None

    def to_toml(self) -> str:
        """The spec as ``job.toml`` text."""
        text = _table({
            "executor_class": self.executor_class,
            "program": self.program,
            "image": self.image,
            "image_blob": self.image_blob,
            "args": list(self.args) or None,
            "env": dict(self.env) or None,
            "readiness_http": self.readiness_http,
            "readiness_tcp": self.readiness_tcp,
            "logs_storage": self.logs_storage,
            "on_trusted_miner": self.on_trusted_miner or None,
            "expires_in_secs": self.expires_in_secs,
        })
        if self.deadlines:
            text += "[deadlines]\n" + _table(self.deadlines)
        for volume in self.volumes:
            text += "[[volumes]]\n" + _table(volume._fields())
        for upload in self.uploads:
            text += "[[uploads]]\n" + _table(upload._fields())
        return text

    @classmethod
    def from_toml(cls, text: str) -> "JobSpec":
        """A spec from ``job.toml`` text (fields are checked when it is submitted)."""
        doc = dict(tomllib.loads(text))
        doc["volumes"] = [Volume(**v) for v in doc.get("volumes", [])]
        doc["uploads"] = [Upload(**u) for u in doc.get("uploads", [])]
        return cls(**doc)

    @classmethod
    def from_file(cls, path: PathLike) -> "JobSpec":
        """A spec from a ``job.toml`` file."""
        with open(path, encoding="utf-8") as file:
            return cls.from_toml(file.read())


def volume_list_toml(volume_msg_id: int, fetch: Sequence[Volume], upload: Sequence[Upload]) -> str:
    """A volume list as the TOML of ``horde job volumes``."""
    text = f"volume_msg_id = {int(volume_msg_id)}\n"
    for volume in fetch:
        text += "[[fetch]]\n" + _table(volume._fields())
    for item in upload:
        text += "[[upload]]\n" + _table(item._fields())
    return text
