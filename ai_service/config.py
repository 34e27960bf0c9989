"""Settings: one typed, immutable object built from the environment at start-up.

Nothing else in the service reads ``os.environ`` for configuration; the object is passed
down explicitly.  Names and defaults are the contract's (CONTRACT.md, "Configuration").
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ai_service.errors import ConfigError as ConfigError  # defined in errors.py, importable from here as before

log = logging.getLogger("ai_service.config")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _int(name: str, raw: str, lo: int | None = None, hi: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
    if lo is not None and value < lo:
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{name} must be {bound}, not {value}")
    if hi is not None and value > hi:
        bound = f"between {lo} and {hi}" if lo is not None else f"at most {hi}"
        raise ConfigError(f"{name} must be {bound}, not {value}")
    return value


def _float(name: str, raw: str, lo: float = 0.0) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if value < lo:
        raise ConfigError(f"{name} must be at least {lo}, not {value}")
    return value


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return value


def _jobs_prefix(raw: str) -> str:
    """``JOBS_PREFIX`` as a folder-style storage key (``jobs/``)."""
    from ai_service.errors import UnsafeKey
    from ai_service.keys import validate_key

    value = raw.strip()
    try:
        validate_key(value)
    except UnsafeKey as exc:
        raise ConfigError(f"JOBS_PREFIX must be a safe storage prefix: {exc.message}") from None
    return value if value.endswith("/") else value + "/"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (where guest/guest is acceptable)."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, order=True)
class BrokerNode:
    """One RabbitMQ node of ``RABBITMQ_HOST``: where to connect (and the TLS name to check)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _port(name: str, entry: str, raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: {entry!r} has no valid port (host or host:port)") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name}: port of {entry!r} must be between 1 and 65535")
    return port


def _node(name: str, entry: str, default_port: int) -> BrokerNode:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (a bare IPv6 address too)."""
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or not host or (rest and not rest.startswith(":")):
            raise ConfigError(f"{name}: {entry!r} is not [address] or [address]:port")
        return BrokerNode(host, _port(name, entry, rest[1:]) if rest else default_port)
    if entry.count(":") > 1:
        try:
            return BrokerNode(str(ipaddress.IPv6Address(entry)), default_port)
        except ValueError:
            raise ConfigError(f"{name}: {entry!r} is not host or host:port (bracket IPv6: [addr]:port)") from None
    host, sep, raw_port = entry.partition(":")
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise ConfigError(f"{name}: {entry!r} is not a host name or address")
    return BrokerNode(host, _port(name, entry, raw_port) if sep else default_port)


def parse_nodes(raw: str, default_port: int, name: str = "RABBITMQ_HOST") -> tuple[BrokerNode, ...]:
    """The nodes of a comma-separated ``RABBITMQ_HOST`` (each ``host`` or ``host:port``,
    the port defaulting to ``RABBITMQ_PORT``), in order, each once."""
    entries = [e.strip() for e in raw.split(",")]
    if not any(entries):
        raise ConfigError(f"{name} names no host")
    if "" in entries:
        raise ConfigError(f"{name} has an empty entry in {raw!r}")
    nodes = tuple(_node(name, e, default_port) for e in entries)
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"{name} names a node twice in {raw!r}")
    return nodes


@dataclass(frozen=True)
class Settings:
    """Every setting of the service; see CONTRACT.md for what each one means."""

    # broker
    enable_rabbitmq: bool = True
    rabbitmq_host: str = "localhost"  # one host or a cluster's nodes: see rabbitmq_nodes
    rabbitmq_port: int = 5672
    rabbitmq_user: str = "guest"
    rabbitmq_password: str = field(default="guest", repr=False)
    rabbitmq_vhost: str = "/"
    rabbitmq_ssl: bool = False
    rabbitmq_ca_file: str | None = None
    rabbitmq_cert_file: str | None = None
    rabbitmq_key_file: str | None = None
    rabbitmq_heartbeat: int = 60
    rabbitmq_queue_type: str = "quorum"
    rabbitmq_delivery_limit: int = 5
    # names
    train_request_queue: str = "train_request_q"
    train_update_queue: str = "train_update_q"
    train_result_queue: str = "train_result_q"
    convert_request_queue: str = "convert_request_q"
    convert_update_queue: str = "convert_update_q"
    convert_result_queue: str = "convert_result_q"
    infer_request_queue: str = "infer_request_q"
    infer_result_queue: str = "infer_result_q"
    events_exchange: str = "ai.events"
    control_exchange: str = "ai.control"
    dead_letter_exchange: str = "ai.dlx"
    # CONTRACT.md "Control": a cancel outlives the absence of every worker this long (seconds;
    # the x-max-age of the cancel stream bound to CONTROL_EXCHANGE)
    cancel_retention: int = 24 * 3600
    # storage
    storage_backend: str = "local"
    storage_dir: Path = Path("./data")
    s3_bucket: str | None = None
    # worker
    worker_name: str = ""
    work_dir: Path = Path("./.work")
    device: str = "auto"
    log_format: str = "text"
    log_level: str = "INFO"
    metrics_port: int | None = None
    # HTTP (CONTRACT.md "HTTP"; README "HTTP"): the API, health and metrics on one server
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    http_token: str = field(default="", repr=False)  # never logged; /v1/* needs it when set
    heartbeat_seconds: float = 5.0  # worker.<state>.<name> beats on EVENTS_EXCHANGE; 0 = none
    # bounded worker internals (ours, documented in the README)
    control_queue_size: int = 1000  # cancels waiting for the cancel hook; past it they are dropped
    metrics_threads: int = 4  # handler threads of the metrics/health server
    metrics_max_connections: int = 256  # open metrics/health connections; past it new ones are closed at once
    metrics_request_timeout: float = 5.0  # seconds a connection has to send its request line and headers
    # limits and tuning (ours, documented in the README)
    max_message_bytes: int = 16 * 1024 * 1024
    lease_seconds: int = 300
    retry_backoff_seconds: float = 1.0  # a retryable failure is tried again after this, doubling
    retry_backoff_max_seconds: float = 30.0  # cap of that backoff
    spool_max_messages: int = 10000
    # SPOOL_MAX_BYTES: the publisher spool's bound in bytes on disk, beside SPOOL_MAX_MESSAGES;
    # once either is reached, publishing waits (or fails with SpoolFull) until the broker is back
    spool_max_bytes: int = 1024 * 1024 * 1024
    reconnect_max_delay: float = 30.0
    batch_window_ms: int = 5
    max_batch: int = 8
    max_images_per_request: int = 256
    max_inline_image_bytes: int = 8 * 1024 * 1024
    model_cache_size: int = 4
    # inference worker (ours, documented in workers/inference/)
    infer_prefetch: int = 16  # deliveries in flight = handler threads feeding the batcher
    infer_threads: int = 0  # torch CPU threads for .pt/.torchscript; 0 = every core the process may use
    infer_decode_threads: int = 0  # requests decoding images at once (fetch, base64, Pillow); 0 = cores, 2..8
    model_version_ttl: float = 1.0  # seconds a model's version (ETag) is trusted before the next stat; 0 = per request
    model_cache_max_mb: int = 2048  # estimated memory of the cached models
    max_image_bytes: int = 16 * 1024 * 1024  # one stored image object
    max_image_pixels: int = 40_000_000  # one image, checked on its header before decoding
    max_request_pixels: int = 64_000_000  # all images of one request together
    # containment (CONTRACT.md "Common rules"; README "Security")
    jobs_prefix: str = "jobs/"  # the service's own area in storage; no request key may name it
    trust_external_models: bool = False  # load exported formats the service did not record
    max_det: int = 1000
    max_imgsz: int = 4096
    max_train_batch: int = 256
    max_epochs: int = 10000
    max_dataloader_workers: int = 16
    allow_ram_cache: bool = False
    max_export_batch: int = 64
    max_dataset_image_pixels: int = 40_000_000  # one dataset image, checked on its header
    max_dataset_files: int = 1_000_000  # images a dataset's train + val may name

    def __post_init__(self) -> None:
        self.rabbitmq_nodes  # noqa: B018 - an invalid node list is a settings error at once

    @property
    def rabbitmq_nodes(self) -> tuple[BrokerNode, ...]:
        """``RABBITMQ_HOST`` as the nodes to try, in order (ConfigError when invalid)."""
        return parse_nodes(self.rabbitmq_host, self.rabbitmq_port)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``env`` (``os.environ`` by default); raise ConfigError."""
        values = _typed_values(fields(cls), os.environ if env is None else env)
        _check_values(values)
        return cls(**values)

    def for_program(self, program: str) -> "Settings":
        """Fill in the default ``WORKER_NAME`` (``<hostname>/<program>``)."""
        if self.worker_name:
            return self
        return replace(self, worker_name=f"{socket.gethostname()}/{program}")

    @property
    def http_api_allowed(self) -> bool:
        """The ``/v1`` API is served: on a loopback ``HTTP_HOST``, or with ``HTTP_TOKEN`` set."""
        return bool(self.http_token) or is_loopback(self.http_host.strip("[]"))

    def insecurity(self) -> str | None:
        """Why this broker configuration is only fit for development, or None."""
        remote = [node.host for node in self.rabbitmq_nodes if not is_loopback(node.host)]
        if remote and self.rabbitmq_user == "guest" and self.rabbitmq_password == "guest":
            return "default guest/guest credentials on a non-loopback host"
        if remote and not self.rabbitmq_ssl:
            return f"no TLS to remote host {remote[0]}"
        return None

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict safe to log (password masked)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["rabbitmq_password"] = "***"
        out["http_token"] = "***" if self.http_token else ""
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def _typed_values(settings_fields: Any, env: Mapping[str, str]) -> dict[str, Any]:
    """Each variable that is set (blank counts as unset), parsed by its field's type."""
    values: dict[str, Any] = {}
    for f in settings_fields:
        name = f.name.upper()
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        if f.type == "bool":
            values[f.name] = _bool(name, raw)
        elif f.type == "int":
            values[f.name] = _int(name, raw, lo=0)
        elif f.type == "int | None":
            values[f.name] = _int(name, raw, lo=0, hi=65535)
        elif f.type == "float":
            values[f.name] = _float(name, raw)
        elif f.type == "Path":
            values[f.name] = Path(raw)
        else:
            values[f.name] = raw
    return values


def _check_values(values: dict[str, Any]) -> None:
    """Defaults that depend on other variables, choices and bounds (in place)."""
    if "rabbitmq_port" not in values:
        values["rabbitmq_port"] = 5671 if values.get("rabbitmq_ssl", False) else 5672
    if not 1 <= values["rabbitmq_port"] <= 65535:
        raise ConfigError("RABBITMQ_PORT must be between 1 and 65535")
    values["rabbitmq_queue_type"] = _choice(
        "RABBITMQ_QUEUE_TYPE", values.get("rabbitmq_queue_type", "quorum"), ("quorum", "classic")
    )
    values["storage_backend"] = _choice("STORAGE_BACKEND", values.get("storage_backend", "local"), ("local", "s3"))
    values["log_format"] = _choice("LOG_FORMAT", values.get("log_format", "text"), ("text", "json"))
    level = values.get("log_level", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {level!r}")
    values["log_level"] = level
    if values.get("storage_backend") == "s3" and not values.get("s3_bucket"):
        raise ConfigError("STORAGE_BACKEND=s3 needs S3_BUCKET")
    bounds = (
        (values.get("rabbitmq_delivery_limit", 5) < 1, "RABBITMQ_DELIVERY_LIMIT must be at least 1"),
        (values.get("rabbitmq_heartbeat", 60) > 3600, "RABBITMQ_HEARTBEAT must be at most 3600 seconds"),
        (values.get("lease_seconds", 300) < 2, "LEASE_SECONDS must be at least 2"),
    )
    for broken, message in bounds:
        if broken:
            raise ConfigError(message)
    if "jobs_prefix" in values:
        values["jobs_prefix"] = _jobs_prefix(values["jobs_prefix"])
