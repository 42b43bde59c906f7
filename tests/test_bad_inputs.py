"""The bad-input corpus: every broken file or argument gives a LoramixError with a clear message, the CLI prints one
line and exits 1 without a traceback, and nothing half-written is left behind.

Each case builds its broken input from a good checkpoint or adapter in a temporary directory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramix
from loramix import AdapterError, BaseModelMismatchError, CheckpointError, ConfigError
from loramix.experts import read_adapter

from conftest import char_tokenizer, run_cli, tiny_llama


@pytest.fixture(scope="module")
def good(llama_dir, llama_experts, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    mix = loramix.from_pretrained(llama_dir, llama_experts, tokenizer=char_tokenizer())
    mix.save(root / "ckpt")
    return {"ckpt": root / "ckpt", "adapter": llama_experts["protein"], "root": root}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _garbage(path):
    path.write_bytes(os.urandom(300))


def _edit_tensors(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _poison(tensor, index, value):
    tensor.view(-1)[index] = value


def _first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


# (name, how to break the checkpoint, error class, message)
CHECKPOINT_CASES = [
    (
        "truncated experts",
        lambda d: _truncate(d / "experts.safetensors"),
        CheckpointError,
        r"experts\.safetensors is not a readable safetensors file",
    ),
    (
        "garbage gate",
        lambda d: _garbage(d / "gate.safetensors"),
        CheckpointError,
        r"gate\.safetensors is not a readable safetensors file",
    ),
    (
        "missing experts file",
        lambda d: (d / "experts.safetensors").unlink(),
        CheckpointError,
        r"experts\.safetensors is missing",
    ),
    (
        "expert tensor of wrong shape",
        lambda d: _edit_tensors(
            d / "experts.safetensors", lambda t: t.__setitem__(_first_key(t, "q_proj.lora_A"), torch.zeros(3, 32))
        ),
        loramix.ShapeMismatchError,
        r"module 'model\.layers\.0\.self_attn\.q_proj': stacked lora_A \(3, 32\)",
    ),
    (
        "expert tensor of integer dtype",
        lambda d: _edit_tensors(
            d / "experts.safetensors",
            lambda t: t.__setitem__(_first_key(t, "q_proj.lora_B"), t[_first_key(t, "q_proj.lora_B")].long()),
        ),
        CheckpointError,
        r"'model\.layers\.0\.self_attn\.q_proj\.lora_B' has dtype torch\.int64; expected floating",
    ),
    (
        "gate tensor of integer dtype",
        lambda d: _edit_tensors(d / "gate.safetensors", lambda t: t.__setitem__("last.bias", t["last.bias"].long())),
        CheckpointError,
        r"tensor 'last\.bias' has dtype torch\.int64; expected floats",
    ),
    (
        "gate tensor missing",
        lambda d: _edit_tensors(d / "gate.safetensors", lambda t: t.pop("last.bias")),
        CheckpointError,
        r"missing tensors \['last\.bias'\]",
    ),
    (
        "unknown config key",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m.update(shiny=True)),
        CheckpointError,
        r"unknown key\(s\) \['shiny'\]",
    ),
    (
        "malformed gate field",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m["mix_config"]["gate"].update(temperature="hot")),
        CheckpointError,
        r"gate\.temperature='hot' must be a number >= 0\.001",
    ),
    (
        "gate temperature that underflows the softmax",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m["mix_config"]["gate"].update(temperature=1e-300)),
        CheckpointError,
        r"loramix_config\.json: gate\.temperature=1e-300 must be a number >= 0\.001",
    ),
    (
        "config not JSON",
        lambda d: (d / "loramix_config.json").write_text("{"),
        CheckpointError,
        r"loramix_config\.json is not valid JSON",
    ),
    (
        "config missing",
        lambda d: (d / "loramix_config.json").unlink(),
        CheckpointError,
        r"loramix_config\.json is missing",
    ),
    (
        "NaN in a gate weight",
        lambda d: _edit_tensors(d / "gate.safetensors", lambda t: _poison(t["last.weight"], 3, float("nan"))),
        CheckpointError,
        r"gate\.safetensors: tensor 'last\.weight' holds 1 NaN/Inf value",
    ),
    (
        "Inf in an expert weight",
        lambda d: _edit_tensors(
            d / "experts.safetensors", lambda t: _poison(t[_first_key(t, "q_proj.lora_B")], 0, float("inf"))
        ),
        CheckpointError,
        r"experts\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.lora_B' holds 1 NaN/Inf value",
    ),
    (
        "NaN scale",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m["layers"][1].update(scales=[float("nan"), 1, 1])),
        CheckpointError,
        r"layers\[1\] .* finite numeric scales",
    ),
    (
        "negative scale",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m["layers"][0]["scales"].__setitem__(0, -2.0)),
        CheckpointError,
        r"layers\[0\] \('model\.layers\.0\.self_attn\.q_proj'\): scales\[0\]=-2\.0 must be in \(0, 65504\]",
    ),
    (
        "scale of 1e30",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m["layers"][0]["scales"].__setitem__(1, 1e30)),
        CheckpointError,
        r"layers\[0\] \('model\.layers\.0\.self_attn\.q_proj'\): scales\[1\]=1e\+30 must be in \(0, 65504\]",
    ),
    (
        "adapter_config rank that disagrees with the tensors",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m["experts"][0]["adapter_config"].update(r=8)),
        CheckpointError,
        r"experts\[0\] \('protein'\): its adapter_config gives rank 8 at 'model\.layers\.0\.self_attn\.q_proj', "
        r"but its tensors there have rank 4",
    ),
    (
        "adapter_config alpha that disagrees with the scales",
        lambda d: _edit_json(
            d / "loramix_config.json", lambda m: m["experts"][0]["adapter_config"].update(lora_alpha=80)
        ),
        CheckpointError,
        r"experts\[0\] \('protein'\): its adapter_config gives the scale 20\.0 \(lora_alpha / r\) at "
        r"'model\.layers\.0\.self_attn\.q_proj', but layers\[0\] records 2\.0",
    ),
    (
        "adapter_config targets that disagree with the tensors",
        lambda d: _edit_json(
            d / "loramix_config.json", lambda m: m["experts"][2]["adapter_config"].update(target_modules=["q_proj"])
        ),
        CheckpointError,
        r"experts\[2\] \('qa'\): has tensors at 'model\.layers\.0\.self_attn\.v_proj', which its adapter_config "
        r"target_modules \['q_proj'\] does not match",
    ),
    (
        "expert name that is not a string",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m["experts"][0].update(name=7)),
        CheckpointError,
        r"experts\[0\] needs a non-empty string 'name' \(got 7\)",
    ),
    (
        "config nested 100k deep",
        lambda d: (d / "loramix_config.json").write_text("[" * 100_000 + "]" * 100_000),
        CheckpointError,
        r"loramix_config\.json is nested too deeply",
    ),
    (
        "newer format",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m.update(format_version=2)),
        CheckpointError,
        r"format_version=2, this loramix reads format_version 1",
    ),
]


@pytest.mark.parametrize(("name", "brk", "error", "message"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_broken_checkpoints(good, tmp_path, name, brk, error, message):
    path = _copy(good["ckpt"], tmp_path / "ckpt")
    brk(path)
    with pytest.raises(error, match=message):
        loramix.load(path)


def test_checkpoint_for_another_base(good):
    with pytest.raises(BaseModelMismatchError, match=r"base weights differ"):
        loramix.load(good["ckpt"], base=tiny_llama(seed=42))


ADAPTER_CASES = [
    (
        "truncated adapter",
        lambda d: _truncate(d / "adapter_model.safetensors"),
        AdapterError,
        r"adapter_model\.safetensors is not a readable safetensors file",
    ),
    (
        "missing adapter weights",
        lambda d: (d / "adapter_model.safetensors").unlink(),
        AdapterError,
        r"no adapter_model\.safetensors in",
    ),
    (
        "rank that is not a number",
        lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(r="eight")),
        AdapterError,
        r"field 'r'='eight' must be a finite number > 0",
    ),
    (
        "alpha NaN",
        lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(lora_alpha=float("nan"))),
        AdapterError,
        r"field 'lora_alpha'=nan must be a finite number > 0",
    ),
    (
        "alpha Inf",
        lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(lora_alpha=float("inf"))),
        AdapterError,
        r"field 'lora_alpha'=inf must be a finite number > 0",
    ),
    (
        "alpha zero",
        lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(lora_alpha=0)),
        AdapterError,
        r"field 'lora_alpha'=0 must be a finite number > 0",
    ),
    (
        "rank_pattern that is not a regular expression",
        lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(rank_pattern={"[": 4})),
        AdapterError,
        r"field 'rank_pattern' has the pattern '\[', which is not a valid regular expression",
    ),
    (
        "alpha_pattern value NaN",
        lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(alpha_pattern={"q_proj": float("nan")})),
        AdapterError,
        r"field 'alpha_pattern'\['q_proj'\]=nan must be a finite number > 0",
    ),
    (
        "alpha of 1e30",
        lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(lora_alpha=1e30)),
        AdapterError,
        r"expert 'x' .*: module '.*' has the scale 2\.5e\+29 \(lora_alpha / r\); expected at most 65504",
    ),
    (
        "NaN in an adapter weight",
        lambda d: _edit_tensors(
            d / "adapter_model.safetensors",
            lambda t: _poison(t[_first_key(t, "q_proj.lora_A.weight")], 1, float("nan")),
        ),
        AdapterError,
        r"expert 'x': .*adapter_model\.safetensors: tensor '.*q_proj\.lora_A\.weight' holds 1 NaN/Inf",
    ),
    (
        "adapter tensor of integer dtype",
        lambda d: _edit_tensors(
            d / "adapter_model.safetensors",
            lambda t: t.__setitem__(
                _first_key(t, "q_proj.lora_A.weight"), t[_first_key(t, "q_proj.lora_A.weight")].long()
            ),
        ),
        AdapterError,
        r"has lora_A of dtype torch\.int64",
    ),
    (
        "unexpected tensor",
        lambda d: _edit_tensors(
            d / "adapter_model.safetensors",
            lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(2, 2)),
        ),
        AdapterError,
        r"unexpected tensor 'base_model\.model\.lm_head\.weight'",
    ),
]


@pytest.mark.parametrize(("name", "brk", "error", "message"), ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_broken_adapters(good, tmp_path, name, brk, error, message):
    path = _copy(good["adapter"], tmp_path / "adapter")
    brk(path)
    with pytest.raises(error, match=message):
        read_adapter("x", path)


def test_pickle_adapter_with_code_is_refused(good, tmp_path):
    path = _copy(good["adapter"], tmp_path / "bin")
    (path / "adapter_model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Payload()}, path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="refused to unpickle"):
        read_adapter("x", path)
    assert not (tmp_path / "pwned").exists()


def test_non_finite_inputs_never_reach_the_gate(good, tmp_path):
    mix = loramix.load(good["ckpt"])
    embeds = torch.zeros(1, 3, 32)
    embeds[0, 1, 4] = float("nan")
    with pytest.raises(ConfigError, match="inputs_embeds contain NaN or infinite values"):
        mix(inputs_embeds=embeds)
    scalings = torch.full((mix.n_layers, mix.n_experts), float("inf"))
    with pytest.raises(ConfigError, match="scalings contain NaN or infinite values"):
        mix.generate(torch.tensor([[5, 6]]), scalings=scalings)
    from loramix.interop.static import export_static

    with pytest.raises(ConfigError, match="the scalings contain NaN or infinite values"):
        export_static(mix, scalings, tmp_path / "static")
    assert not (tmp_path / "static").exists() and not list(tmp_path.glob(".static*"))


_cli = run_cli


def _one_clean_line(result, message):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]


def test_cli_reports_broken_inputs_in_one_line(good, tmp_path):
    truncated = _copy(good["ckpt"], tmp_path / "truncated")
    _truncate(truncated / "experts.safetensors")
    _one_clean_line(_cli("generate", truncated, "-p", "x"), "experts.safetensors is not a readable safetensors file")
    bad_json = _copy(good["ckpt"], tmp_path / "badjson")
    (bad_json / "loramix_config.json").write_text("{")
    _one_clean_line(_cli("info", bad_json), "loramix_config.json is not valid JSON")
    other_base = _copy(good["ckpt"], tmp_path / "otherbase")
    tiny_llama(seed=7).save_pretrained(tmp_path / "other")
    _edit_json(other_base / "loramix_config.json", lambda m: m["base"].update(name_or_path=str(tmp_path / "other")))
    _one_clean_line(_cli("generate", other_base, "-p", "x"), "base weights differ")
    scalings = tmp_path / "nan.json"
    scalings.write_text("[NaN, 0, 1]")
    result = _cli("export", good["ckpt"], "--format", "static", "--scalings", scalings, "--out", tmp_path / "out")
    _one_clean_line(result, "the scalings contain NaN or infinite values")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    "error", [AdapterError, BaseModelMismatchError, CheckpointError, ConfigError, loramix.ShapeMismatchError, OSError]
)
def test_every_loramix_error_is_one_line_in_the_cli(error, tmp_path, monkeypatch, capsys):
    from loramix import cli

    def broken(path):
        raise error(f"{path}: broken on purpose\nwith a second line the CLI must not print")

    from loramix.commands import checkpoints

    monkeypatch.setattr(checkpoints, "read_checkpoint_meta", broken)
    code, lines = _main(monkeypatch, capsys, "info", tmp_path)
    assert (code, lines) == (1, [f"error: {tmp_path}: broken on purpose"])
    monkeypatch.setattr(sys, "argv", ["loramix", "--debug", "info", str(tmp_path)])
    with pytest.raises(error, match="broken on purpose"):  # --debug: the exception itself, with its traceback
        cli.main()


# ---------------------------------------------------------------------- nothing lost: what a command may replace


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _user_dir(root, marker):
    """A directory a user owns: the marker file of some loramix output, plus files of their own."""
    (root / "sub").mkdir(parents=True)
    (root / marker).write_text("{}")
    (root / "precious.txt").write_text("x")
    (root / "sub" / "notes.md").write_text("y")
    return _tree(root)


def test_a_checkpoint_is_replaced_only_when_every_file_in_it_is_ours(good, tmp_path):
    mix = loramix.load(good["ckpt"])
    out = tmp_path / "ckpt"
    mix.save(out)
    mix.save(out)  # our own directory: replaced
    assert (out / ".loramix-written.json").is_file()
    (out / "notes.md").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds 'notes\.md', which loramix did not write; refusing"):
        mix.save(out)
    assert (out / "notes.md").read_text() == "mine"
    # written by an older loramix (no manifest): replaced when it holds only the names a checkpoint has
    legacy = _copy(good["ckpt"], tmp_path / "legacy")
    (legacy / ".loramix-written.json").unlink()
    mix.save(legacy)
    (legacy / ".loramix-written.json").unlink()
    (legacy / "precious.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"holds 'precious\.txt'"):
        mix.save(legacy)
    assert not list(tmp_path.glob(".*"))  # no temporary directory left behind


def test_export_with_base_never_replaces_a_directory_it_did_not_write(good, tmp_path):
    from loramix.interop.mistralrs import export_mistralrs

    mix = loramix.load(good["ckpt"])
    user = tmp_path / "d"
    before = _user_dir(user, "config.json")
    with pytest.raises(CheckpointError, match=r"--with-base .*d was not written by this command"):
        export_mistralrs(mix, tmp_path / "xl", base_model_id="b", with_base=user)
    assert _tree(user) == before and not (tmp_path / "xl").exists()
    # the base bundled in a checkpoint is the checkpoint's, not the export's (run from another directory)
    bundled = tmp_path / "bundled"
    mix.save(bundled, include_base=True)
    files = _tree(bundled)
    result = subprocess.run(
        [sys.executable, "-m", "loramix", "export", bundled, "--format", "mistralrs", "--out", "xl",
         "--with-base", bundled / "base"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "COLUMNS": "300"},
    )
    _one_clean_line(result, "bundled/base is the directory the base model was loaded from")
    assert _tree(bundled) == files


def test_loading_a_bundled_checkpoint_records_where_its_base_really_is(good, tmp_path, monkeypatch):
    mix = loramix.load(good["ckpt"])
    mix.save(tmp_path / "bundled", include_base=True)
    monkeypatch.chdir(tmp_path)  # a "base" relative to the current directory must never be what is recorded
    reloaded = loramix.load(tmp_path / "bundled")
    assert reloaded.base_reference == str((tmp_path / "bundled" / "base").resolve())
    reloaded.save(tmp_path / "moved")  # without the base: the reference must still lead to it
    assert loramix.load(tmp_path / "moved").base_reference == reloaded.base_reference


def test_training_refuses_an_output_directory_before_the_first_step(good, llama_dir, tmp_path):
    from loramix.train import TrainConfig, train_expert, train_gate

    records = [{"prompt": "ab", "completion": "cd"}] * 4
    config = TrainConfig(max_steps=1, progress=False)
    mix = loramix.load(good["ckpt"])
    for name, marker, run in (
        ("gate", "loramix_config.json", lambda out: train_gate(mix, records, out, train=config)),
        ("expert", "adapter_config.json", lambda out: train_expert(llama_dir, records, out, train=config,
                                                                    tokenizer=char_tokenizer())),
    ):
        for kind in ("with-marker", "without-marker"):
            out = tmp_path / f"{name}-{kind}"
            before = _user_dir(out, marker if kind == "with-marker" else "other.json")
            with pytest.raises(CheckpointError, match="refusing to replace"):
                run(out)
            assert _tree(out) == before
            assert not out.with_name(out.name + ".run").exists(), "refused only after training started"


def test_output_directories_respect_the_umask_and_stale_temporaries_are_cleaned(good, tmp_path):
    from loramix.interop.peft import write_peft_experts

    mix = loramix.load(good["ckpt"])
    stale = tmp_path / ".ckpt.tmp-999999999-deadbeef"  # left by a killed save (no such process)
    live = tmp_path / f".ckpt.tmp-{os.getpid()}-cafecafe"  # a save in progress (this process is alive)
    # a save killed between its two renames leaves the previous directory renamed aside
    stale_old = tmp_path / ".ckpt.old-999999999-deadbeef"
    legacy_old = tmp_path / ".ckpt.old-0badcafe"  # named so by earlier versions, without the process id
    live_old = tmp_path / f".ckpt.old-{os.getpid()}-cafecafe"
    for folder in (stale, live, stale_old, legacy_old, live_old):
        folder.mkdir()
    old = os.umask(0o022)
    try:
        mix.save(tmp_path / "ckpt")
        write_peft_experts(mix, tmp_path / "adapters")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    assert not stale.exists() and live.exists()
    assert not stale_old.exists() and not legacy_old.exists() and live_old.exists()
    files = [*(tmp_path / "ckpt").rglob("*"), *(tmp_path / "adapters").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files if p.is_file()}
    assert "ckpt/experts.safetensors" in modes and "adapters/0/adapter_model.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != "0o644"} == {}  # safetensors files were 0600


def test_an_interrupted_analysis_leaves_nothing(good, tmp_path, monkeypatch):
    from loramix.analysis import analyze, report

    mix = loramix.load(good["ckpt"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_usage_by_domain", interrupted)  # after the table, before summary.json
    with pytest.raises(KeyboardInterrupt):
        analyze(mix, tmp_path / "out", prompts=["abc"], fmt="csv")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    summary = analyze(mix, tmp_path / "out", prompts=["abc"], fmt="csv")
    assert (tmp_path / "out" / "summary.json").is_file() and summary["figures"]
    user = tmp_path / "user"
    before = _user_dir(user, "summary.json")
    with pytest.raises(CheckpointError, match="holds"):
        analyze(mix, user, prompts=["abc"], fmt="csv")
    assert _tree(user) == before


def test_an_interrupted_conversation_leaves_no_empty_agent_folders(good, tmp_path, monkeypatch):
    from loramix.analysis import converse as conversation

    mix = loramix.load(good["ckpt"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversation, "plot_trajectory", interrupted)  # after every turn, before the transcript
    with pytest.raises(KeyboardInterrupt):
        conversation.converse(mix, tmp_path / "talk", opening="ab", turns=2, max_new_tokens=2, fmt="csv")
    assert list(tmp_path.iterdir()) == []


def test_scalings_files_nested_too_deeply_are_refused(tmp_path):
    from loramix.interop.static import read_scalings_file

    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=r"deep\.json is nested too deeply"):
        read_scalings_file(path, 2, 3)


def test_eval_never_overwrites_a_results_file_it_did_not_write(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("mine")
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "ab", "completion": "c", "domain": "qa"}) + "\n")
    result = _cli("eval", good["ckpt"], "--data", data, "--out", out, "--system", "base")
    _one_clean_line(result, "results.json exists and loramix did not write it")
    assert (out / "results.json").read_text() == "mine"


# ---------------------------------------------------------------------- nothing silent: training


def _trainer(mix, tmp_path, loss_fn=None, **config):
    from loramix.train import TrainConfig
    from loramix.train.common import batch_logits, prepare_data
    from loramix.train.gate import gate_loss
    from loramix.train.loop import Trainer

    records = [{"prompt": "ab", "completion": "cdef"}, {"prompt": "ba", "completion": "fedc"}] * 8
    config = TrainConfig(**{"batch_size": 2, "progress": False, "log_every": 1, **config})
    train_set, _ = prepare_data(mix.tokenizer, records, None, 0.0, 32, config.seed)
    mix.freeze()
    trainable = {n: p for n, p in mix.named_parameters() if p.requires_grad}
    return Trainer(mix, trainable, train_set, None, config, tmp_path / "run", loss_fn=loss_fn or gate_loss,
                   logits_fn=batch_logits, pad_token_id=0)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(good, tmp_path):
    from loramix.errors import TrainingError
    from loramix.train.gate import gate_loss

    calls = []

    def diverging(model, batch):
        calls.append(1)
        loss, extras = gate_loss(model, batch)
        return (loss * float("nan") if len(calls) == 5 else loss), extras

    trainer = _trainer(loramix.load(good["ckpt"]), tmp_path, diverging, max_steps=8, save_every=2)
    with pytest.raises(TrainingError, match=r"the loss became nan at step 5; .*step-4 \(--resume continues"):
        trainer.train()
    assert trainer.latest_checkpoint().name == "step-4"
    gate = load_file(str(trainer.latest_checkpoint() / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in gate.values())


def test_saving_non_finite_weights_is_refused(good, tmp_path):
    mix = loramix.load(good["ckpt"])
    with torch.no_grad():
        mix.gate.last.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save: the gate: tensor 'last\.weight' holds 1 NaN"):
        mix.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_resume_with_changed_settings_is_refused_unless_forced(good, tmp_path):
    _trainer(loramix.load(good["ckpt"]), tmp_path, max_steps=4, save_every=2).train()
    changed = r"--resume with changed settings \(learning_rate 0\.001 -> 0\.01, seed 0 -> 1\)"
    with pytest.raises(ConfigError, match=changed):
        _trainer(loramix.load(good["ckpt"]), tmp_path, max_steps=4, save_every=2, seed=1, learning_rate=0.01).train(
            resume=True
        )
    _trainer(loramix.load(good["ckpt"]), tmp_path, max_steps=4, save_every=2, seed=1).train(resume=True, force=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "the metrics of the steps after the resume point were not dropped"


# ---------------------------------------------------------------------- bounds before allocation


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ({"width": 10**7}, r"gate\.width=10000000 must be an integer from 1 to 131072"),
        ({"depth": 10**6}, r"gate\.depth=1000000 must be an integer from 1 to 64"),
        ({"depth": 3, "width": 100_000}, r"a gate of [\d,]+ parameters, more than the base model's"),
    ],
)
def test_oversized_gates_are_refused_before_anything_is_built(good, llama_dir, llama_experts, gate, message):
    layers = dict(loramix.load(good["ckpt"]).model.named_modules())
    with pytest.raises(ConfigError, match=message):
        loramix.from_pretrained(llama_dir, llama_experts, loramix.MixConfig(gate=gate))
    assert dict(loramix.load(good["ckpt"]).model.named_modules()).keys() == layers.keys()


# ---------------------------------------------------------------------- one line, not a traceback


def _main(monkeypatch, capsys, *args):
    """The `loramix` entry point in this process (fast): its exit code and its stderr lines."""
    from loramix.cli import main

    monkeypatch.setattr(sys, "argv", ["loramix", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def test_cli_bad_arguments_give_one_line(good, llama_dir, tmp_path, monkeypatch, capsys):
    ckpt, data = good["ckpt"], tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "ab", "completion": "cd"}) + "\n")
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    cases = [
        (2, ["generate", ckpt, "-p", "x", "--batch-size", "0"], "'--batch-size': Input should be greater than or"),
        (2, ["analyze", ckpt, "-p", "x", "--out", tmp_path / "a", "--batch-size", "0"], "'--batch-size'"),
        (2, ["analyze", ckpt, "--data", data, "--out", tmp_path / "a", "--limit", "-1"], "'--limit'"),
        (2, ["generate", ckpt, "-p", "x", "--seed", str(2**70)], "'--seed': Input should be less than or equal"),
        (2, ["serve", ckpt, "--port", "99999"], "'--port': Input should be less than or equal to 65535"),
        (2, ["demo", "--threads", "0"], "'--threads'"),
        (2, ["serve", ckpt, "--api-key", ""], "the API key is empty, which would turn authentication off"),
        (2, ["serve", ckpt, "--kv-cache-memory", "lots"], "--kv-cache-memory: 'lots' is not a size; expected"),
        (1, ["serve", ckpt, "--kv-cache-memory", "1KiB"], "--kv-cache-memory=1.00KiB holds 0 tokens"),
        (1, ["serve", ckpt, "--max-model-len", "100000"], "--max-model-len=100000 is above the model's context"),
        (1, ["generate", ckpt, "-p", "x", "--device", "cuda"], "device='cuda': this machine has no CUDA device"),
        (1, ["generate", ckpt, "-p", "x", "--device", "warp9"], "device='warp9' is not a device name"),
        (1, ["generate", ckpt, "-p", "x", "--base", afile], "is a file; expected a model directory"),
        (1, ["generate", ckpt, "-p", "x", "--base", tmp_path / "none" / "x"], "no such directory"),
        (1, ["train-expert", "--base", llama_dir, "--data", data, "--out", tmp_path / "e", "--rank", "0"],
         "rank=0 must be an integer >= 1"),
        (1, ["train-expert", "--base", llama_dir, "--data", data, "--out", tmp_path / "e", "--dropout", "2"],
         "dropout=2.0 must be a number in [0, 1)"),
        (1, ["train-expert", "--base", llama_dir, "--data", data, "--out", tmp_path / "e", "--alpha", "-1"],
         "alpha=-1.0 must be a finite number > 0"),
        (1, ["train-expert", "--base", llama_dir, "--data", data, "--out", tmp_path / "e", "--target", "qq_proj"],
         "target module(s) ['qq_proj'] are not in the base model"),
        (2, ["train-expert", "--base", llama_dir, "--data", data, "--out", tmp_path / "e", "--report-to", "pigeon"],
         "Invalid value for --report-to: report_to='pigeon' is not a tracker Accelerate knows"),
        (2, ["train-gate", "--base", llama_dir, "-e", f"a={llama_dir}", "--data", data, "-o", tmp_path / "e",
             "--depth", "0"], "Invalid value for --depth: gate.depth=0 must be an integer from 1 to 64"),
        (2, ["train-gate", "--init", ckpt, "--data", data, "-o", tmp_path / "e", "--top-k", "2"],
         "Invalid value for --init: top_k comes from the --init checkpoint; "
         "only --scaling-layer and --trainable-experts can"),
        (2, ["train-gate", "--base", llama_dir, "-e", f"a={llama_dir}", "--data", data, "-o", tmp_path / "e",
             "--lr", "0"], "Invalid value for --lr: learning_rate=0.0 must be > 0"),
        (2, ["train-gate", "--base", llama_dir, "-e", f"a={llama_dir}", "-e", f"a={afile}", "--data", data,
             "-o", tmp_path / "e"], "Invalid value for --expert: expert name 'a' is given twice"),
        (2, ["mix", "--base", llama_dir, "-e", f"a={llama_dir}", "-e", f"a={afile}", "-o", tmp_path / "e"],
         "Invalid value for --expert: expert name 'a' is given twice"),
        (2, ["mix", "--base", llama_dir, "-e", f"a={llama_dir}", "-o", tmp_path / "e", "--temperature", "1e-300"],
         "Invalid value for --temperature: gate.temperature=1e-300 must be a number >= 0.001"),
    ]
    for code, args, message in cases:
        got, lines = _main(monkeypatch, capsys, *args)
        assert (got, len(lines)) == (code, 1), (args, lines)
        assert lines[0].startswith("error: ") and message in lines[0], (args, lines)
    assert not (tmp_path / "e").exists() and not (tmp_path / "a").exists()


def test_serving_on_a_public_interface_without_a_key_warns(good, tmp_path, monkeypatch, capsys):
    code, lines = _main(monkeypatch, capsys, "serve", tmp_path / "missing", "--host", "0.0.0.0")
    assert code == 1 and "serving on 0.0.0.0 without an API key" in lines[0] and "is not a directory" in lines[1]
    code, lines = _main(monkeypatch, capsys, "serve", tmp_path / "missing", "--host", "::1")
    assert code == 1 and len(lines) == 1  # loopback: no warning
    from loramix.serve import create_app

    with pytest.raises(ConfigError, match="api_key is empty"):
        create_app(loramix.load(good["ckpt"]), api_key="  ")


def test_info_and_hub_bases_fail_in_one_line(good, tmp_path, monkeypatch, capsys):
    named = _copy(good["ckpt"], tmp_path / "named")
    _edit_json(named / "loramix_config.json", lambda m: m["experts"][1].update(name=3))
    code, lines = _main(monkeypatch, capsys, "info", named)
    assert code == 1 and "experts[1] needs a non-empty string 'name' (got 3)" in lines[0] and len(lines) == 1
    hub = _copy(good["ckpt"], tmp_path / "hub")
    _edit_json(hub / "loramix_config.json", lambda m: m["base"].update(name_or_path="some-org/some-model"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, lines = _main(monkeypatch, capsys, "generate", hub, "-p", "x")
    assert code == 1 and len(lines) == 1
    assert "'some-org/some-model' is a hub id that is not in the local Hugging Face cache" in lines[0]
    assert "HF_HUB_OFFLINE is set; pass a local directory of the base instead (--base DIR" in lines[0]


def test_unreadable_files_say_permission_denied(good, tmp_path, monkeypatch):
    # The suite runs as root, whom file modes do not stop: deny access the way the kernel reports it to others.
    from loramix import io
    from loramix.io import read_tensors

    ckpt = _copy(good["ckpt"], tmp_path / "ckpt")
    denied = {ckpt / "loramix_config.json", ckpt / "gate.safetensors"}
    monkeypatch.setattr(io.os, "access", lambda path, mode: Path(path) not in denied)
    with pytest.raises(CheckpointError, match=r"loramix_config\.json: permission denied \(the checkpoint's config\)"):
        loramix.load(ckpt)
    with pytest.raises(CheckpointError, match=r"gate\.safetensors: permission denied \(the gate\)"):
        read_tensors(ckpt / "gate.safetensors", "the gate")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("seed", 2**64, "seed: Input should be less than or equal to 18446744073709551615"),
        ("prompt", "ab\ud800", "prompt: Value error, holds the lone surrogate U+D800 at character 2"),
        ("max_tokens", "10", "max_tokens: Input should be a valid integer"),
        ("max_tokens", True, "max_tokens: Input should be a valid integer"),
        ("loramix", {"repetition_penalty": float("inf")}, "repetition_penalty: Input should be a finite number"),
        ("temperature", float("nan"), "temperature: Input should be a finite number"),
        ("model", "\ud800", "model: Value error, holds the lone surrogate U+D800 at character 0"),
        ("logit_bias", {"\u00b2": 1}, "logit_bias: Value error, keys must be token ids written as ASCII digits"),
        ("logit_bias", {"\u0663": 1}, "keys must be token ids written as ASCII digits without leading zeros"),
        ("logit_bias", {"000000000003": 1}, "got '000000000003'"),
        ("logit_bias", {"7" * 5000: 1}, "keys must be token ids written as ASCII digits"),
        ("logit_bias", {"\ud800": "x"}, "Input should be a valid number"),
        ("logit_bias", {"3": float("inf")}, "Input should be a finite number"),
        ("logit_bias", {"3": 101}, "Input should be less than or equal to 100"),
        ("presence_penalty", 2.5, "presence_penalty: Input should be less than or equal to 2"),
        ("frequency_penalty", float("-inf"), "frequency_penalty: Input should be a finite number"),
        ("loramix", {"repetition_penalty": 1e-300}, "repetition_penalty: Input should be greater than or equal to 0.0"),
        ("loramix", {"repetition_penalty": 1e6}, "repetition_penalty: Input should be less than or equal to 100"),
    ],
)
def test_server_refuses_bad_fields_with_400(good, field, value, message):
    from fastapi.testclient import TestClient

    from loramix.serve import create_app

    body = {"model": "m", "prompt": "ab", "max_tokens": 2, field: value}
    with TestClient(create_app(loramix.load(good["ckpt"]), model_id="m")) as client:
        headers = {"content-type": "application/json"}
        response = client.post("/v1/completions", content=json.dumps(body), headers=headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_a_missing_quantization_backend_is_one_line_naming_the_extra(good, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if torchao were not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    code, lines = _main(monkeypatch, capsys, "generate", good["ckpt"], "-p", "x", "--quantize", "int8")
    assert (code, len(lines)) == (1, 1), lines
    assert lines[0] == (
        "error: quantize=int8 needs the 'torchao' package, which is not installed: pip install 'loramix[quant]'"
    )


def test_a_library_that_fails_to_import_is_one_line(tmp_path, monkeypatch, capsys):
    from loramix import cli

    def broken(path):  # what transformers raises when an installed backend (torchao) is broken inside
        raise ImportError("cannot import name '_C' from partially initialized module 'torchao'")

    from loramix.commands import checkpoints

    monkeypatch.setattr(checkpoints, "read_checkpoint_meta", broken)
    code, lines = _main(monkeypatch, capsys, "info", tmp_path)
    assert (code, len(lines)) == (1, 1), lines
    assert lines[0].startswith("error: a library failed to import (ImportError: cannot import name '_C' from "), lines
    monkeypatch.setattr(sys, "argv", ["loramix", "--debug", "info", str(tmp_path)])
    with pytest.raises(ImportError):  # --debug: the exception itself, with its traceback
        cli.main()
