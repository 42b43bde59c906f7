"""The config dataclasses behind the commands' options: each setting refused in one place, naming its field."""

import dataclasses

import pytest

from loramix.config import GateConfig, MixConfig
from loramix.errors import ConfigError
from loramix.serve.config import ServeConfig, check_api_key, replica_bounds
from loramix.settings import SEED_MAX, SEED_MIN, EvalConfig, GenerateConfig, LoadConfig, SamplingOptions


def _field(make):
    with pytest.raises(ConfigError) as error:
        make()
    return error.value.field, str(error.value)


@pytest.mark.parametrize(
    ("make", "field", "message"),
    [
        (lambda: ServeConfig(api_key=""), "api_key", "the API key is empty, which would turn authentication off"),
        (lambda: ServeConfig(api_key="cl\u00e9"), "api_key", "printable ASCII"),
        (lambda: ServeConfig(port=0), "port", "port=0 must be >= 1 and <= 65535"),
        (lambda: ServeConfig(max_batch=0), "max_batch", "max_batch=0 must be >= 1"),
        (lambda: ServeConfig(kv_cache_memory="lots"), "kv_cache_memory", "'lots' is not a size"),
        (lambda: ServeConfig(tool_call_parser="smoke"), "tool_call_parser", "unknown tool-call parser 'smoke'"),
        (lambda: ServeConfig(address="auto"), "address", "needs --replicas N"),
        (lambda: ServeConfig(max_replicas=3), "max_replicas", "needs --replicas N"),
        (lambda: ServeConfig(replicas=2, min_replicas=3), "replicas", "2 is below --min-replicas 3"),
        (lambda: ServeConfig(replicas=1, min_replicas=3, max_replicas=2), "min_replicas", "3 is above"),
        (lambda: LoadConfig(dtype="float8"), "dtype", "unknown dtype 'float8'"),
        (lambda: LoadConfig(quantize="int3"), "quantize", "unknown quantization 'int3'"),
        (lambda: SamplingOptions(seed=SEED_MAX + 1), "seed", "must be >="),
        (lambda: SamplingOptions(temperature=-1.0), "temperature", "temperature=-1.0 must be >= 0.0"),
        (lambda: GenerateConfig(mode="turbo"), "mode", "unknown mode 'turbo'; expected one of granular, prompt"),
        (lambda: GenerateConfig(max_new_tokens=0), "max_new_tokens", "max_new_tokens=0 must be >= 1"),
        (lambda: EvalConfig(systems=["base", "nope"]), "systems", "unknown system(s) ['nope']; expected some of"),
        (lambda: EvalConfig(limit=0), "limit", "limit=0 must be >= 1"),
        (lambda: GateConfig(depth=0), "depth", "gate.depth=0 must be an integer from 1 to 64"),
        (lambda: GateConfig(top_k=None, topk_softmax=True), "topk_softmax", "gate.topk_softmax=true needs"),
        (lambda: MixConfig(sparse_top_k="often"), "sparse_top_k", "sparse_top_k='often' must be one of"),
    ],
)
def test_each_setting_is_refused_naming_its_field(make, field, message):
    got, text = _field(make)
    assert got == field and message in text, (got, text)


def test_the_server_the_replicas_and_the_cli_share_one_check():
    """The API key and the replica bounds: one function each, called by ServeConfig, create_app's check and Ray's
    Scaling / ReplicaConfig alike (the same message and field)."""
    from loramix.serve import app as serve_app

    assert serve_app.check_api_key is check_api_key
    assert _field(lambda: check_api_key(" "))[0] == "api_key"
    assert replica_bounds(2, None, None) == (1, 2) and replica_bounds(2, 0, 4) == (0, 4)
    ray = pytest.importorskip("loramix.serve.ray")
    assert _field(lambda: ray.Scaling(replicas=2, min_replicas=3)) == _field(lambda: replica_bounds(2, 3, None))
    assert _field(lambda: ray.ReplicaConfig(checkpoint="x", api_key=""))[0] == "api_key"


def test_serve_config_gives_create_app_and_ray_their_arguments():
    import inspect

    from loramix.serve.app import create_app

    config = ServeConfig(max_batch=4, max_tokens=99, replicas=2, max_replicas=3)
    accepted = set(inspect.signature(create_app).parameters)
    assert set(config.app_options()) <= accepted and config.app_options()["max_tokens_limit"] == 99
    scaling = config.scaling()
    assert scaling["max_ongoing_requests"] == 4 and scaling["target_ongoing_requests"] == 4.0
    assert dataclasses.replace(config, batching=False).scaling()["max_ongoing_requests"] == 1
    assert SEED_MIN < 0 < SEED_MAX


def test_a_refused_eval_setting_is_a_usage_error_naming_the_option(tmp_path, monkeypatch, capsys):
    import sys

    from loramix.cli import main

    monkeypatch.setattr(sys, "argv", ["loramix", "eval", str(tmp_path), "--data", "x.jsonl", "--system", "nope"])
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit) as exit_:
        main()
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert "Invalid value for --system: unknown system(s) ['nope']; expected some of" in lines[0]
