"""`loramix serve --replicas N`: the one-process app on Ray Serve replicas (serve/ray.py).

One local Ray instance for the module, started by `loramix.serve.ray.run` (the command line's path) with 2 replicas
of a tiny checkpoint; the command line's bad inputs run without Ray starting. The tests marked `ray_slow` (a replica
killed, and two that start Ray instances of their own) are left out of the default run: `pytest -m ray_slow
tests/test_ray.py` runs them, as CI does in a step of its own."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from typer.testing import CliRunner

import loramix
from loramix.cli import app
from loramix.serve import create_app
from test_serve import served_mix

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(llama_dir, llama_experts, tmp_path_factory):
    return served_mix(llama_dir, llama_experts).save(tmp_path_factory.mktemp("ray") / "ckpt")


@pytest.fixture(scope="module")
def replicas(checkpoint):
    """`run()` in a thread: a local Ray instance, 2 replicas behind one port; the URL once they answer."""
    pytest.importorskip("ray.serve")
    from loramix.serve.ray import ReplicaConfig, Scaling, run

    port, ready, stop, failed = _free_port(), threading.Event(), threading.Event(), []
    config = ReplicaConfig(str(checkpoint), model_id="tiny", api_key=KEY, app={"max_tokens_limit": 64, "max_batch": 4})

    def serve() -> None:
        try:
            run(config, Scaling(replicas=2, max_ongoing_requests=4), port=port, on_ready=ready.set, stop=stop)
        except BaseException as exc:
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(240)
    assert not failed, failed
    assert ready.is_set(), "the replicas did not start"
    yield f"http://127.0.0.1:{port}"
    stop.set()
    thread.join(60)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def one_process(checkpoint):
    """The same checkpoint served by one process (create_app under uvicorn), as `loramix serve` without Ray."""
    import uvicorn

    app_ = create_app(loramix.load(checkpoint), model_id="tiny", api_key=KEY, max_tokens_limit=64, max_batch=4)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app_, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


PROMPTS = [f"{word} {i}" for i, word in enumerate(["GRAVY", "ACDE", "Length of", "xyz", "KKLL", "MKTAY"] * 4)]


def _complete(url: str, prompt: str, max_tokens: int = 12) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)


def test_replicas_answer_as_one_process_and_name_the_replica(replicas, one_process):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # 24 concurrent greedy requests to each server
        spread = list(pool.map(lambda p: _complete(replicas, p), PROMPTS))
        alone = list(pool.map(lambda p: _complete(one_process, p), PROMPTS))
    assert all(r.status_code == 200 for r in spread + alone), [r.text for r in spread if r.status_code != 200]
    assert [r.json()["choices"][0]["text"] for r in spread] == [r.json()["choices"][0]["text"] for r in alone]
    names = {r.headers["x-loramix-replica"] for r in spread}
    assert len(names) >= 2, names
    assert all("loramix#loramix#" in n for n in names)
    assert "x-loramix-replica" not in alone[0].headers


def test_auth_limits_and_error_shapes_as_one_process(replicas, one_process):
    cases = [
        ({"model": "tiny", "prompt": "a"}, {}),  # no key: 401
        ({"model": "other", "prompt": "a"}, AUTH),  # 404
        ({"model": "tiny", "prompt": "a", "max_tokens": 65}, AUTH),  # above --max-tokens: 400
        ({"model": "tiny", "prompt": "a", "n": "2"}, AUTH),  # a string for an integer: 400
    ]
    for body, headers in cases:
        spread = httpx.post(replicas + "/v1/completions", json=body, headers=headers, timeout=30)
        alone = httpx.post(one_process + "/v1/completions", json=body, headers=headers, timeout=30)
        assert (spread.status_code, spread.json()) == (alone.status_code, alone.json())
        assert spread.status_code in (400, 401, 404)
        assert spread.headers["x-loramix-replica"]  # the guard's and the handlers' own answers carry it too
    health = httpx.get(replicas + "/health", timeout=30)  # open, as in one process
    assert health.status_code == 200 and health.json()["model"] == "tiny"
    metrics = httpx.get(replicas + "/metrics", timeout=30)  # the answering replica's own registry
    assert metrics.status_code == 200 and "loramix_generated_tokens_total" in metrics.text
    assert metrics.headers["x-loramix-replica"]


@pytest.mark.ray_slow
def test_a_killed_replica_fails_its_requests_cleanly_and_is_restarted(replicas):
    import ray

    victim = _complete(replicas, "GRAVY").headers["x-loramix-replica"]
    actor = ray.get_actor(victim, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
    long = {"model": "tiny", "prompt": "GRAVY", "max_tokens": 64, "temperature": 0, "logit_bias": {"2": -100}}

    def one(_: int) -> tuple[int, str | None, str]:
        r = httpx.post(replicas + "/v1/completions", json=long, headers=AUTH, timeout=60)  # no hang: 60 s at most
        return r.status_code, r.headers.get("x-loramix-replica"), r.text

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        deadline = time.time() + 30
        while ray.get(actor.get_num_ongoing_requests.remote(), timeout=30) < 2 and time.time() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)  # with requests in its batch
        results = [f.result() for f in futures]
    codes = [code for code, _, _ in results]
    assert all(code == 200 or 500 <= code < 600 for code in codes), codes
    assert any(500 <= code < 600 for code in codes), codes  # the victim's requests failed, they did not hang
    assert all(name != victim for code, name, _ in results if code == 200)  # the others came from the survivor
    assert 200 in codes, codes  # and the survivor was not disturbed

    deadline, names = time.time() + 120, set()
    while time.time() < deadline and len(names - {victim}) < 2:  # Ray starts a new replica in the dead one's place
        r = _complete(replicas, "xyz")
        if r.status_code == 200:
            names.add(r.headers["x-loramix-replica"])
        time.sleep(0.2)
    assert len(names - {victim}) >= 2, names
    assert _complete(replicas, "ACDE").status_code == 200


# ---------------------------------------------------------------------- the command line


def _serve(*args: str):
    return runner.invoke(app, ["serve", *map(str, args)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "0"], "Invalid value for '--replicas'"),
        (["--address", "127.0.0.1:6379"], "--address: needs --replicas N"),
        (["--num-gpus-per-replica", "1"], "--num-gpus-per-replica: needs --replicas N"),
        (["--replicas", "2", "--min-replicas", "3"], "--replicas: 2 is below --min-replicas 3"),
        (["--replicas", "3", "--max-replicas", "2"], "--replicas: 3 is above --max-replicas 2"),
        (["--replicas", "1", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas: 3 is above"),
    ],
)
def test_bad_replica_flags_are_usage_errors(checkpoint, args, message):
    result = _serve(checkpoint, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def _main(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    from loramix.cli import main

    monkeypatch.setattr("sys.argv", ["loramix", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    return exit_.value.code, [line for line in err.splitlines() if line.strip()]


def _serve_fails(checkpoint, *args: str, **env: str) -> str:
    """`loramix serve CKPT ARGS` in a subprocess (120 s at most) that must exit 1 without a traceback: its last
    stderr line."""
    result = subprocess.run(
        [sys.executable, "-m", "loramix", "serve", str(checkpoint), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **env},
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


def test_unreachable_address_is_one_line_without_waiting(checkpoint):
    pytest.importorskip("ray.serve")
    port = _free_port()  # nothing listens there; Ray itself would retry for minutes: a subprocess, with a timeout
    line = _serve_fails(checkpoint, "--replicas", "2", "--address", f"127.0.0.1:{port}")
    assert line.startswith(f"error: --address 127.0.0.1:{port}: no Ray cluster answers"), line


@pytest.mark.ray_slow
def test_more_gpus_than_the_cluster_has_is_one_line_not_a_wait(checkpoint):
    pytest.importorskip("ray.serve")
    line = _serve_fails(checkpoint, "--replicas", "1", "--num-gpus-per-replica", "1", CUDA_VISIBLE_DEVICES="")
    assert line.startswith("error: --num-gpus-per-replica 1: no node of the Ray cluster has that many GPUs"), line


@pytest.mark.ray_slow
def test_a_replica_that_cannot_load_is_an_error_naming_why(tmp_path):
    pytest.importorskip("ray.serve")
    script = (
        "from loramix.serve.ray import ReplicaConfig, Scaling, run\n"
        "from loramix.errors import LoramixError\n"
        "try:\n"
        f"    run(ReplicaConfig({str(tmp_path / 'missing')!r}), Scaling(replicas=1), port=0)\n"
        "except LoramixError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert errors == [f"ERROR the replicas failed to start: loramix.errors.CheckpointError: {tmp_path / 'missing'} "
                      "is not a directory (expected a loramix checkpoint)"], result.stdout  # fmt: skip


def test_missing_ray_names_the_extra(checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    code, lines = _main(monkeypatch, capsys, "serve", checkpoint, "--replicas", "2")
    assert code == 1
    assert lines == ["error: Ray Serve is not installed: pip install 'loramix[ray]'"], lines


def test_flags_map_to_the_replicas_and_ray_serve_options(checkpoint, monkeypatch):
    pytest.importorskip("ray.serve")
    import loramix.serve.ray as serve_ray

    seen = {}
    monkeypatch.setattr(
        serve_ray, "run", lambda config, scaling, **kw: seen.update(config=config, scaling=scaling, **kw)
    )
    result = _serve(
        checkpoint, "--replicas", "2", "--min-replicas", "1", "--max-replicas", "4", "--num-cpus-per-replica", "2",
        "--num-gpus-per-replica", "0.5", "--max-batch", "6", "--max-queue", "10", "--api-key", KEY,
        "--address", "auto", "--port", "9001", "--keep-alive-timeout", "7",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config, scaling = seen["config"], seen["scaling"]
    assert config.checkpoint == str(checkpoint.resolve()) and config.api_key == KEY and config.threads == 1
    assert config.app["max_batch"] == 6 and config.app["max_queue"] == 10
    assert seen["address"] == "auto" and seen["port"] == 9001 and seen["keep_alive_timeout"] == 7
    options = scaling.deployment_options()
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 2,
        "max_replicas": 4,
        "target_ongoing_requests": 6.0,  # default: one full batch per replica
    }
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert options["max_ongoing_requests"] == 6  # a replica's batch; the rest wait for a free row in Ray's queue
    assert options["max_queued_requests"] == 10  # --max-queue
    assert "num_replicas" not in options
    fixed = serve_ray.Scaling(replicas=3).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed


def test_build_reads_a_serve_run_config(checkpoint):
    pytest.importorskip("ray.serve")
    from loramix.serve.ray import build

    application = build({"checkpoint": str(checkpoint), "replicas": "3", "num_cpus": "0.5", "model_id": "x"})
    deployment = application._bound_deployment
    assert deployment.num_replicas == 3
    assert deployment.max_ongoing_requests == 8  # the replica's batch: create_app's default max_batch
    batch16 = build({"checkpoint": str(checkpoint), "app": {"max_batch": 16}})._bound_deployment
    assert batch16.max_ongoing_requests == 16
    assert deployment.ray_actor_options["num_cpus"] == 0.5
    assert json.dumps(deployment.init_args[0].checkpoint) == json.dumps(str(checkpoint))


@pytest.mark.parametrize("reuse_port", [False, True], ids=["one-process-server", "another-ray-proxy"])
def test_a_port_in_use_is_one_line_before_ray_starts(checkpoint, reuse_port):
    """A port held by a one-process server (a plain listener), or by another `serve --replicas` (Ray's proxy
    listens with SO_REUSEPORT, which would let a second one share the port silently): one line, exit 1."""
    pytest.importorskip("ray.serve")
    with socket.socket() as held:
        if reuse_port:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        line = _serve_fails(checkpoint, "--replicas", "1", "--port", str(port))
    assert line.startswith(f"error: --port {port}: 127.0.0.1:{port} is already in use"), line


@pytest.mark.ray_slow
def test_sigterm_drains_the_requests_in_flight_and_exits_0_leaving_no_process(tmp_path):
    """SIGTERM (what systemd, Docker and Kubernetes send) of `serve --replicas`: the request in flight is answered,
    Ray shuts down, the command exits 0, and none of the processes it started is left."""
    pytest.importorskip("ray.serve")
    import psutil

    from conftest import char_tokenizer, make_adapter, save_model, tiny_llama

    base = save_model(tiny_llama(seed=5, max_position_embeddings=4096), tmp_path / "base")
    mix = loramix.from_pretrained(base, {"a": make_adapter(base, tmp_path / "a", seed=1)}, tokenizer=char_tokenizer())
    checkpoint = mix.save(tmp_path / "long")
    port = _free_port()
    command = [sys.executable, "-m", "loramix", "serve", str(checkpoint), "--replicas", "1", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--max-tokens", "3000"], stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    try:
        for line in proc.stderr:
            if line.startswith("serving"):
                break
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started, "Ray started no process"
        body = {"model": "long", "prompt": "GRAVY", "max_tokens": 2000, "temperature": 0, "logit_bias": {"2": -100}}
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
            time.sleep(1.0)  # the request is in the replica's batch (2000 tokens take the tiny model seconds)
            assert not long.done()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(120) == 0, proc.stderr.read()[-3000:]
            answer = long.result()
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2000, answer.text
        time.sleep(1.0)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [p.name() for p in left]
    finally:
        if proc.poll() is None:
            proc.kill()
