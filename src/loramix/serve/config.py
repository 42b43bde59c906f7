"""What `loramix serve` is told: one dataclass, a docstring per field, each setting checked here and only here.

`ServeConfig`'s fields are the options of `loramix serve` (options.py derives them, help from the docstrings); the
same object gives `create_app` its keyword arguments (`app_options()`) and Ray Serve its replica and scaling plan
(serve/ray.py). The API key and the replica bounds are checked by the functions below, which `create_app` and
serve/ray.py call too. Imports no torch (`loramix --help` stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from ..options import check_bounds, cli_metadata

__all__ = ["RAY_FIELDS", "ServeConfig", "check_api_key", "replica_bounds"]

RAY_FIELDS = (
    "address",
    "num_cpus_per_replica",
    "num_gpus_per_replica",
    "threads_per_replica",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
)
"""The fields that mean something only with `replicas` (Ray Serve)."""


def check_api_key(api_key: str | None, name: str = "api_key") -> None:
    """An API key must be non-empty (empty would turn authentication off) and printable ASCII: HTTP clients send
    header values as ASCII or latin-1, so a key with other characters would match for some clients only."""
    if api_key is None:
        return
    if not api_key.strip():
        raise ConfigError(
            f"{name} is empty, which would turn authentication off; give a non-empty key, or none to serve without one",
            field="api_key",
        )
    if not (api_key.isascii() and api_key.isprintable()):
        raise ConfigError(
            f"{name} has characters other than printable ASCII, which HTTP clients do not send alike in a header: "
            "use letters, digits and punctuation (e.g. `openssl rand -hex 32`)",
            field="api_key",
        )


def replica_bounds(replicas: int, min_replicas: int | None, max_replicas: int | None) -> tuple[int, int]:
    """The autoscaling bounds (least, most) with Ray Serve's defaults (min 1, max the initial count), checked
    against the initial count; a ConfigError naming the field otherwise."""
    least = 1 if min_replicas is None else min_replicas
    most = max(replicas, least) if max_replicas is None else max_replicas
    if least < 0:
        raise ConfigError(f"{least} must be >= 0", field="min_replicas")
    if most < 1:
        raise ConfigError(f"{most} must be >= 1", field="max_replicas")
    if least > most:
        raise ConfigError(f"{least} is above --max-replicas {most}", field="min_replicas")
    if replicas < least:
        raise ConfigError(f"{replicas} is below --min-replicas {least}", field="replicas")
    if replicas > most:
        raise ConfigError(f"{replicas} is above --max-replicas {most}", field="replicas")
    return least, most


@dataclass
class ServeConfig:
    """The server: where it listens, what a request may ask, its memory, its batch, and (with `replicas`) Ray
    Serve. Where the model comes from (device, dtype, base, quantize) is `settings.LoadConfig`."""

    host: str = "127.0.0.1"
    """Interface to bind (default: loopback only)."""
    port: int = field(default=8000, metadata=cli_metadata(min=1, max=65535))
    """TCP port."""
    model_id: str | None = None
    """Model name clients use (default: the folder name)."""
    api_key: str | None = field(default=None, metadata=cli_metadata(envvar="LORAMIX_API_KEY"))
    """Require 'Authorization: Bearer KEY'. A key on the command line is visible in the process list: prefer the
    LORAMIX_API_KEY environment variable."""
    max_prompt_tokens: int | None = field(default=None, metadata=cli_metadata(min=1))
    """Longest prompt accepted (default: --max-model-len - 1)."""
    max_tokens: int = field(default=1024, metadata=cli_metadata(min=1))
    """Largest max_tokens a request may ask for."""
    max_model_len: int | None = field(default=None, metadata=cli_metadata(min=2))
    """Longest prompt + max_tokens (default: the model's context); beyond it: 400."""
    kv_cache_memory: str | None = None
    """KV cache pool size, e.g. 2GiB or 512MiB, allocated at start (default: 4GiB on a CPU; on CUDA what
    --gpu-memory-utilization leaves). See docs/serving.md, Memory."""
    gpu_memory_utilization: float | None = field(default=None, metadata=cli_metadata(min=0.01, max=1.0))
    """CUDA: the share of the GPU's memory this server may use; the KV pool takes what the weights leave (default
    0.9)."""
    max_num_batched_tokens: int = field(default=512, metadata=cli_metadata(min=16))
    """Tokens of a long prompt prefilled between two decode steps (chunked prefill)."""
    prefix_caching: bool = True
    """Reuse the KV blocks of prompts that share a prefix (a system prompt)."""
    batching: bool = True
    """Continuous batching (off: one at a time)."""
    max_batch: int = field(default=8, metadata=cli_metadata(min=1))
    """Sequence slots of the continuous batch."""
    max_queue: int = field(default=256, metadata=cli_metadata(min=1))
    """Jobs waiting for a slot; beyond it: 503 (--replicas: requests in Ray's queue)."""
    max_body: int = field(default=1 << 20, metadata=cli_metadata(min=1))
    """Largest request body in bytes; beyond it: 413."""
    request_timeout: float = field(default=600.0, metadata=cli_metadata(min=0.001))
    """Seconds per request (504)."""
    header_timeout: float = field(default=10.0, metadata=cli_metadata(min=0.001))
    """Seconds to send a request head (not with --replicas)."""
    body_timeout: float = field(default=30.0, metadata=cli_metadata(min=0.001))
    """Seconds a body may stall (408)."""
    grammar_budget: float = field(default=1.0, metadata=cli_metadata(min=0.001))
    """Seconds a structured-output request's grammar may cost in all (compile, then the waits for its token masks);
    beyond it that request alone gets a 400 naming response_format."""
    keep_alive_timeout: float = field(default=5.0, metadata=cli_metadata(min=0.001))
    """Idle keep-alive seconds."""
    tool_call_parser: str | None = None
    """The tool-call format tool_choice 'auto' reads: hermes, hermes_list, llama3_json, mistral or pythonic
    (default: the chat template's)."""
    log_level: str = "info"
    """uvicorn log level (with --replicas: Ray Serve's)."""
    compile: bool = False
    """Decode with the compiled step (torch.compile over the paged caches; the first batch of each size compiles;
    see docs/generation.md)."""
    replicas: int | None = field(default=None, metadata=cli_metadata(min=1))
    """Serve N replicas on Ray Serve behind one endpoint, each with its own model and continuous batch (needs
    loramix[ray]; docs/scaling.md). Default: one process, no Ray."""
    address: str | None = None
    """With --replicas: join the Ray cluster at HOST:PORT, ray://HOST:PORT or 'auto'. Default: start a local Ray
    instance that ends with the command."""
    num_cpus_per_replica: float = field(default=1.0, metadata=cli_metadata(min=0))
    """With --replicas: CPUs Ray reserves per replica."""
    num_gpus_per_replica: float = field(default=0.0, metadata=cli_metadata(min=0))
    """With --replicas: GPUs Ray reserves per replica (0.5: two share a GPU)."""
    threads_per_replica: int = field(default=1, metadata=cli_metadata(min=1))
    """With --replicas: torch threads in each replica."""
    min_replicas: int | None = field(default=None, metadata=cli_metadata(min=0))
    """With --replicas: autoscale, down to this many replicas (0: to zero)."""
    max_replicas: int | None = field(default=None, metadata=cli_metadata(min=1))
    """With --replicas: autoscale, up to this many replicas."""
    target_ongoing_requests: float | None = field(default=None, metadata=cli_metadata(min=0.001))
    """With autoscaling: the requests per replica Ray Serve aims at (default: --max-batch)."""

    def __post_init__(self) -> None:
        check_bounds(self)
        check_api_key(self.api_key, "the API key")
        if self.kv_cache_memory is not None:
            from ..blocks import paged_budget

            try:
                paged_budget(self.kv_cache_memory)
            except ConfigError as exc:  # "--kv-cache-memory='lots' is not a size; ...": the part after the flag
                raise ConfigError(str(exc).split("=", 1)[-1], field="kv_cache_memory") from None
        if self.tool_call_parser is not None:
            from .toolparsers import PARSERS

            if self.tool_call_parser not in PARSERS:
                raise ConfigError(
                    f"unknown tool-call parser {self.tool_call_parser!r}; known: {', '.join(PARSERS)}",
                    field="tool_call_parser",
                )
        if self.replicas is None:
            given = [f.name for f in fields(self) if f.name in RAY_FIELDS and getattr(self, f.name) != f.default]
            if given:
                raise ConfigError("needs --replicas N (Ray Serve); without it, one process serves", field=given[0])
            return
        replica_bounds(self.replicas, self.min_replicas, self.max_replicas)

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def app_options(self) -> dict[str, Any]:
        """`create_app`'s keyword arguments (but the model's id and the API key)."""
        return dict(
            max_model_len=self.max_model_len,
            kv_cache_memory=self.kv_cache_memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_batched_tokens=self.max_num_batched_tokens,
            prefix_caching=self.prefix_caching,
            max_prompt_tokens=self.max_prompt_tokens,
            max_tokens_limit=self.max_tokens,
            batching=self.batching,
            max_batch=self.max_batch,
            compile=self.compile,
            max_queue=self.max_queue,
            max_body=self.max_body,
            request_timeout=self.request_timeout,
            body_timeout=self.body_timeout,
            grammar_budget=self.grammar_budget,
            tool_call_parser=self.tool_call_parser,
        )

    def scaling(self) -> dict[str, Any]:
        """serve/ray.py `Scaling`'s fields: the replicas, what each reserves, the autoscaling bounds, and Ray's
        handing of at most one batch to a replica (the rest wait in Ray's queue; --max-queue: 503)."""
        target = self.target_ongoing_requests
        if target is None and self.autoscaling:
            target = float(self.max_batch)
        return dict(
            replicas=self.replicas or 1,
            num_cpus=self.num_cpus_per_replica,
            num_gpus=self.num_gpus_per_replica,
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            target_ongoing_requests=target,
            max_ongoing_requests=self.max_batch if self.batching else 1,
            max_queued_requests=self.max_queue,
        )
