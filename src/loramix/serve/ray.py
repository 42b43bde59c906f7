"""The OpenAI-compatible app on Ray Serve: `loramix serve CKPT --replicas N` (needs `pip install 'loramix[ray]'`).

    client ── HTTP ──► Ray Serve proxy (--host/--port, one per node) ──► replica 1: its own model, Engine, Metrics
                        routes each request to a replica                ──► replica 2: ...
                        (the less busy of two, by ongoing requests)      ──► replica N

Every replica is a Ray actor that loads the checkpoint as `loramix serve` does (`loading.load`) and serves the app of
one process, `create_app(model, ...)`, unchanged: the same routes, API key (`_Guard`), body limits, queue (503),
timeouts (504), error shapes and its own continuous batch and Prometheus registry. The one addition is a header on
every response, `x-loramix-replica`, naming the replica that answered (`app#deployment#id`, Ray's replica id).

    deployment(checkpoint, replicas=2, ...)   a bound Ray Serve application, for `serve.run(...)` or your own graph
    build({"checkpoint": ..., ...})           the same from a dict: `serve run loramix.serve.ray:build checkpoint=...`
    run(checkpoint, ...)                      what the command line does: join or start a cluster, deploy, wait

Ray is imported only inside functions: the rest of loramix does not need it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LoramixError
from .config import check_api_key, replica_bounds
from .server import check_port

__all__ = [
    "APP_NAME",
    "RAY_MISSING",
    "REPLICA_HEADER",
    "RayServeError",
    "Replica",
    "ReplicaConfig",
    "Scaling",
    "build",
    "deployment",
    "require_ray",
    "run",
]

logger = logging.getLogger(__name__)

RAY_MISSING = "Ray Serve is not installed: pip install 'loramix[ray]'"
REPLICA_HEADER = "x-loramix-replica"
APP_NAME = "loramix"
"""The Ray Serve application and deployment name (`--model-id` does not change it)."""
_LEVELS = {"critical": "CRITICAL", "error": "ERROR", "warning": "WARNING", "info": "INFO", "debug": "DEBUG"}
_LEVELS["trace"] = "DEBUG"
GCS_PORT = 6379
CLIENT_PORT = 10001


class RayServeError(LoramixError):
    """Ray is missing, the cluster cannot be reached or cannot hold the replicas, or the deployment failed."""


def require_ray() -> tuple[Any, Any]:
    """(ray, ray.serve), or a RayServeError naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise RayServeError(RAY_MISSING) from exc
    return ray, serve


# ---------------------------------------------------------------------- what a replica builds, and how many


@dataclass
class ReplicaConfig:
    """What every replica loads and serves (the one-process `loramix serve` options)."""

    checkpoint: str
    """The checkpoint directory, at the same path on every node that runs a replica."""
    model_id: str | None = None
    """The model name clients use; default: the checkpoint folder's name."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` on every path but /health and /metrics."""
    device: str | None = None
    """cpu, cuda, ...; default: a GPU when the replica has one (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    dtype: str | None = None
    """float32, bfloat16 or float16; default: as the checkpoint records."""
    base: str | None = None
    """A base model directory to use instead of the one the checkpoint records."""
    quantize: str | None = None
    """int8, int4, nf4 or none; default: as the checkpoint records."""
    threads: int = 1
    """torch threads in each replica."""
    app: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `create_app`: max_batch, max_queue, max_body, request_timeout, body_timeout, ..."""

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ConfigError(f"threads={self.threads}: each replica needs at least one torch thread")
        check_api_key(self.api_key)
        if self.model_id is None:
            self.model_id = Path(self.checkpoint).name or APP_NAME


@dataclass
class Scaling:
    """How many replicas, what each reserves from the cluster, and Ray Serve's autoscaling bounds."""

    replicas: int = 1
    """Replicas to start (with autoscaling: the initial number)."""
    num_cpus: float = 1.0
    """CPUs Ray reserves for each replica."""
    num_gpus: float = 0.0
    """GPUs Ray reserves for each replica (fractions share a GPU)."""
    min_replicas: int | None = None
    """Autoscaling: the fewest replicas (0 scales to zero). Setting it or max_replicas turns autoscaling on."""
    max_replicas: int | None = None
    """Autoscaling: the most replicas."""
    target_ongoing_requests: float | None = None
    """Autoscaling: the requests per replica (in flight and queued) Ray Serve aims at; default: max_ongoing_requests."""
    max_ongoing_requests: int = 8
    """Requests Ray hands one replica at once: its batch (`--max-batch`). The others wait in Ray's queue for the
    first replica with a free row (a replica's own queue would fill unevenly: Ray's router sees replica loads late)."""
    max_queued_requests: int | None = None
    """Requests waiting in Ray's queue (per proxy) beyond which Ray answers 503; None: no limit."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas={self.replicas}: at least 1 replica is needed")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("num_cpus and num_gpus per replica must be >= 0")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"max_ongoing_requests={self.max_ongoing_requests}: must be at least 1")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ConfigError(f"max_queued_requests={self.max_queued_requests}: must be at least 1 (or None)")
        if not self.autoscaling:
            if self.target_ongoing_requests is not None:
                raise ConfigError("target_ongoing_requests needs autoscaling: set min_replicas or max_replicas")
            return
        low, high = replica_bounds(self.replicas, self.min_replicas, self.max_replicas)
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise ConfigError(f"target_ongoing_requests={self.target_ongoing_requests}: must be > 0")
        self.min_replicas, self.max_replicas = low, high

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def most(self) -> int:
        """The most replicas this deployment may run at once."""
        return self.max_replicas if self.autoscaling and self.max_replicas is not None else self.replicas

    def deployment_options(self) -> dict[str, Any]:
        """`serve.deployment(...)` options: num_replicas or autoscaling_config, ray_actor_options, ..."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.max_queued_requests is not None:
            options["max_queued_requests"] = self.max_queued_requests
        if self.autoscaling:
            target = self.target_ongoing_requests or float(self.max_ongoing_requests)
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": target,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


# ---------------------------------------------------------------------- one replica


class ReplicaHeader:
    """Pure ASGI middleware: every HTTP response gets `x-loramix-replica: NAME` (errors and streams included)."""

    def __init__(self, app: Any, *, name: str) -> None:
        self.app, self.value = app, name.encode("latin-1", "replace")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != REPLICA_HEADER.encode()]
                message = {**message, "headers": [*headers, (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)


def replica_name() -> str:
    """This replica's Ray Serve id (`app#deployment#id`), or `local` outside a replica."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # not inside a Ray Serve replica
        return "local"


class Replica:
    """One replica: loads the checkpoint (as `loramix serve` does) and serves `create_app`'s app with the replica
    header. Ray Serve builds it through `serve.ingress()` (`__serve_build_asgi_app__` gives the app)."""

    def __init__(self, config: ReplicaConfig) -> None:
        import torch

        from ..base import DTYPES
        from ..loading import load

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        torch.set_num_threads(config.threads)
        self.config = config
        dtype = DTYPES[config.dtype] if config.dtype else None
        self.model = load(config.checkpoint, config.base, device=config.device, dtype=dtype, quantize=config.quantize)
        self.name = replica_name()

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        app = create_app(self.model, model_id=self.config.model_id, api_key=self.config.api_key, **self.config.app)
        app.add_middleware(ReplicaHeader, name=self.name)  # outermost: 401, 413 and 503 carry it too
        return app


def deployment(
    checkpoint: str | Path | None = None,
    *,
    config: ReplicaConfig | None = None,
    scaling: Scaling | None = None,
    name: str = APP_NAME,
    **replica: Any,
) -> Any:
    """A bound Ray Serve application (`serve.run(deployment(ckpt, replicas=2))`) of `Replica`s.
    Either `config` or `checkpoint` with ReplicaConfig's fields (model_id, api_key, device, dtype, threads, app={...});
    `scaling` or Scaling's fields (replicas, num_cpus, num_gpus, min_replicas, max_replicas, target_ongoing_requests,
    max_ongoing_requests: default the replica's batch, app["max_batch"] or 8; max_queued_requests) as keyword
    arguments. `.options(...)` on the returned deployment's class is Ray's own."""
    _, serve = require_ray()
    scale_fields = {f.name for f in dataclasses.fields(Scaling)}
    scale_args = {k: replica.pop(k) for k in list(replica) if k in scale_fields}
    if config is None:
        if checkpoint is None:
            raise ConfigError("deployment() needs a checkpoint (or config=ReplicaConfig(...))")
        config = ReplicaConfig(checkpoint=str(checkpoint), **replica)
    elif checkpoint is not None or replica:
        raise ConfigError("give either config= or the checkpoint and its options, not both")
    if scaling is None:
        # Ray hands a replica at most its batch (Scaling.max_ongoing_requests): create_app's max_batch, default 8
        rows = config.app.get("max_batch", 8) if config.app.get("batching", True) else 1
        scaling = Scaling(**{"max_ongoing_requests": rows, **scale_args})
    elif scale_args:
        raise ConfigError(f"give either scaling= or {sorted(scale_args)}, not both")
    options = scaling.deployment_options()
    env = {"OMP_NUM_THREADS": str(config.threads), "TOKENIZERS_PARALLELISM": "false"}
    options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    cls = serve.deployment(name=name, **options)(serve.ingress()(Replica))
    return cls.bind(config)


def build(args: dict[str, Any]) -> Any:
    """An application builder for Ray Serve's `serve run` and config files: `args` holds ReplicaConfig's and
    Scaling's fields (`checkpoint` is required), e.g. `serve run loramix.serve.ray:build checkpoint=/ckpt replicas=2`.
    Values given on the `serve run` command line are strings; numbers are converted here."""
    args = dict(args)
    numbers = {"replicas": int, "num_cpus": float, "num_gpus": float, "min_replicas": int, "max_replicas": int}
    numbers |= {"target_ongoing_requests": float, "max_ongoing_requests": int, "max_queued_requests": int}
    numbers |= {"threads": int}
    for key, kind in numbers.items():
        if isinstance(args.get(key), str):
            try:
                args[key] = kind(args[key])
            except ValueError as exc:
                raise ConfigError(f"{key}={args[key]!r}: expected a number") from exc
    if "checkpoint" not in args:
        raise ConfigError("the application's args need 'checkpoint' (a loramix checkpoint directory)")
    return deployment(**args)


# ---------------------------------------------------------------------- the command line's path: cluster, deploy, wait


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for a cluster address, or None for `auto` / `local`."""
    if address in ("auto", "local"):
        return None
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, str(CLIENT_PORT if client else GCS_PORT)
    if not port.isdigit():
        raise RayServeError(f"--address {address}: expected HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), int(port)


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail at once (Ray itself retries for minutes) when nothing listens at the cluster address."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RayServeError(
            f"--address {address}: no Ray cluster answers at {target[0]}:{target[1]} ({reason}); start one with "
            "`ray start --head`, or leave --address out to start a local one"
        ) from exc


def _check_resources(ray: Any, scaling: Scaling) -> None:
    """Replicas the cluster cannot hold would wait for resources forever: a RayServeError naming the flag."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    most_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    if scaling.num_gpus > most_gpus:
        raise RayServeError(
            f"--num-gpus-per-replica {scaling.num_gpus:g}: no node of the Ray cluster has that many GPUs "
            f"(the most on one node: {most_gpus:g}); lower it, or add GPU nodes"
        )
    if scaling.num_cpus > most_cpus:
        raise RayServeError(
            f"--num-cpus-per-replica {scaling.num_cpus:g}: no node of the Ray cluster has that many CPUs "
            f"(the most on one node: {most_cpus:g})"
        )
    total = ray.cluster_resources()
    for key, per, flag in (
        ("GPU", scaling.num_gpus, "--num-gpus-per-replica"),
        ("CPU", scaling.num_cpus, "--num-cpus-per-replica"),
    ):
        have = total.get(key, 0.0)
        if per and scaling.replicas * per > have + 1e-9:
            raise RayServeError(
                f"--replicas {scaling.replicas} x {flag} {per:g} need {scaling.replicas * per:g} {key}s; "
                f"the Ray cluster has {have:g}"
            )


def _wait(
    serve: Any, deploy: threading.Thread, failure: list[BaseException], timeout: float, stop: threading.Event
) -> None:
    deadline = time.monotonic() + timeout
    while deploy.is_alive() and not stop.is_set():
        deploy.join(0.5)
        if time.monotonic() > deadline:
            raise RayServeError(
                f"the replicas did not start within {timeout:g} s (see `ray status` for pending resources, "
                "and the replicas' logs under /tmp/ray/session_latest/logs/serve)"
            )
    if failure:
        message = _replica_error(serve) or str(failure[0]).strip() or type(failure[0]).__name__
        raise RayServeError(f"the replicas failed to start: {message}")


def _replica_error(serve: Any) -> str | None:
    """The error a replica raised while starting: the last line of the traceback in Ray Serve's deployment status."""
    try:
        application = serve.status().applications[APP_NAME]
        details = [d.message for d in application.deployments.values() if d.message]
    except Exception:  # the status is gone with the controller
        return None
    lines = [line.strip() for text in details for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errors or lines or [None])[-1]


def run(
    config: ReplicaConfig,
    scaling: Scaling,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    keep_alive_timeout: float = 5.0,
    log_level: str = "warning",
    start_timeout: float = 600.0,
    on_ready: Any = None,
    warn: Any = None,
    stop: threading.Event | None = None,
) -> None:
    """Join the cluster at `address` (or start a local one), deploy the replicas behind one HTTP endpoint on
    host:port, call `on_ready()`, and serve until `stop` is set (SIGTERM sets it too, when called from the main
    thread; or KeyboardInterrupt). A local instance refuses a host:port already in use before Ray starts. On the way
    out the application is deleted first (its replicas finish the requests in flight, up to Ray Serve's
    graceful_shutdown_timeout_s, 20 s), then a cluster started here is shut down. Replicas a local instance cannot
    hold are an error; on a cluster at `address` (which an autoscaler may grow) they are a warning
    (`warn(message)`), and the replicas get `start_timeout` seconds to start."""
    ray, serve = require_ray()
    if address is not None:
        _probe(address)
    else:  # the local instance's proxy binds host:port on this machine
        check_port(host, port, RayServeError)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's "Started Serve ..." lines
    local = address is None
    started = False
    stop = stop or threading.Event()
    try:
        if local:
            cpus = max(os.cpu_count() or 1, int(scaling.most * scaling.num_cpus + 0.999))
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        started = True
        _stop_on_sigterm(stop)
        try:
            _check_resources(ray, scaling)
        except RayServeError as exc:
            if local:
                raise
            # an autoscaling cluster (KubeRay) may add the nodes: wait, up to start_timeout
            (warn or logger.warning)(f"{exc}; waiting up to {start_timeout:g} s for the cluster to grow")
        serve.start(
            http_options={"host": host, "port": port, "keep_alive_timeout_s": max(1, round(keep_alive_timeout))},
            logging_config={"log_level": _LEVELS.get(log_level.lower(), "WARNING")},
        )
        app = deployment(config=config, scaling=scaling)
        failure: list[BaseException] = []

        def deploy() -> None:
            try:
                serve.run(app, name=APP_NAME, route_prefix="/")
            except BaseException as exc:  # reported by _wait in the calling thread
                failure.append(exc)

        thread = threading.Thread(target=deploy, name="loramix-ray-deploy", daemon=True)
        thread.start()
        _wait(serve, thread, failure, start_timeout, stop)
        if on_ready is not None and not stop.is_set():
            on_ready()
        while not stop.wait(0.5):
            pass
    finally:
        if started:
            _shut_down(ray, serve, local)


def _stop_on_sigterm(stop: threading.Event) -> None:
    """SIGTERM sets `stop`, as SIGINT does. `ray.init` installs its own SIGTERM handler in the driver (a
    `sys.exit` from inside whatever the main thread runs), which aborts the driver (exit 134) and drops the requests
    in flight; with `stop` set, `run` deletes the application (the replicas finish the requests they hold, Ray
    Serve's graceful shutdown), shuts Ray down and returns."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())


def _shut_down(ray: Any, serve: Any, local: bool) -> None:
    try:
        # the application first, while the proxies still answer: its replicas finish the requests they hold (Ray
        # Serve's graceful shutdown, up to graceful_shutdown_timeout_s) and new ones are refused
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    except Exception as exc:  # the cluster is already gone
        logger.warning("could not remove the Ray Serve application: %s", exc)
    finally:
        ray.shutdown()
