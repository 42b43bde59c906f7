"""`loramix serve`: the OpenAI-compatible server, in one process (uvicorn) or as replicas on Ray Serve. Its options
are ServeConfig's and LoadConfig's fields (serve/config.py, settings.py), checked there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from ..options import config_options
from ..serve.config import ServeConfig
from ..settings import LoadConfig
from .common import Command, err_console, load_model, read_checkpoint_meta

app = typer.Typer(add_completion=False)

NAMES = {"prefix_caching": "--enable-prefix-caching/--no-enable-prefix-caching", "compile": "--compile"}


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@app.command("serve", cls=Command)
@config_options(LoadConfig, "load")
@config_options(ServeConfig, "config", names=NAMES)
def serve(
    checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory (with its tokenizer)."),
    config: Any = None,
    load: Any = None,
) -> None:
    """Serve a checkpoint behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models)."""
    if config.api_key is None and not is_loopback(config.host):
        err_console.print(
            f"[yellow]warning:[/yellow] serving on {config.host} without an API key: anyone who can reach this host "
            "can use the model (set LORAMIX_API_KEY)"
        )
    name = config.model_id or Path(checkpoint).resolve().name
    if config.replicas is not None:
        serve_replicas(checkpoint, name, config, load)
        return
    from ..serve import create_app
    from ..serve.server import check_port, run

    check_port(config.host, config.port)  # before the model loads (uvicorn would find out after it, exit 3)
    model = load_model(checkpoint, load)
    server_app = create_app(model, model_id=name, api_key=config.api_key, **config.app_options())
    err_console.print(server_app.state.engine.pool_line)
    err_console.print(
        f"serving [bold]{name}[/bold] on http://{config.host}:{config.port}/v1"
        + (" (API key required)" if config.api_key else "")
    )
    run(
        server_app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        header_timeout=config.header_timeout,
        keep_alive_timeout=config.keep_alive_timeout,
    )


def serve_replicas(checkpoint: Path, name: str, config: ServeConfig, load: LoadConfig) -> None:
    """`loramix serve --replicas N`: the same app on Ray Serve (serve/ray.py), until Ctrl-C or SIGTERM."""
    import signal
    import threading

    from ..serve.ray import ReplicaConfig, Scaling, require_ray, run

    require_ray()  # one line naming the extra, before anything else
    if config.address is None:
        read_checkpoint_meta(checkpoint)  # a local cluster reads this path: refuse a wrong one before starting it
    if checkpoint.exists():
        checkpoint = checkpoint.resolve()
    if config.header_timeout != 10.0:
        err_console.print(
            "[yellow]warning:[/yellow] --header-timeout is not applied with --replicas: Ray Serve's proxy has no "
            "request-head timeout (docs/scaling.md)"
        )
    replica = ReplicaConfig(
        checkpoint=str(checkpoint),
        model_id=name,
        api_key=config.api_key,
        threads=config.threads_per_replica,
        app=config.app_options(),
        **vars(load),
    )
    plan = Scaling(**config.scaling())
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    where = f"the Ray cluster at {config.address}" if config.address else "a local Ray instance"
    err_console.print(f"starting {plan.replicas} replica(s) of [bold]{name}[/bold] on {where}")

    def ready() -> None:
        scale = f", autoscaling {plan.min_replicas}..{plan.max_replicas}" if plan.autoscaling else ""
        err_console.print(
            f"serving [bold]{name}[/bold] on http://{config.host}:{config.port}/v1 ({plan.replicas} replica(s) on "
            f"Ray Serve{scale})" + (" (API key required)" if config.api_key else "")
        )

    try:
        run(
            replica,
            plan,
            address=config.address,
            host=config.host,
            port=config.port,
            keep_alive_timeout=config.keep_alive_timeout,
            log_level=config.log_level,
            on_ready=ready,
            warn=lambda message: err_console.print(f"[yellow]warning:[/yellow] {escape(message)}"),
            stop=stop,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
