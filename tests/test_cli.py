"""The command line: real subprocesses for exit codes and error lines, Typer's runner for output."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import loramix
from loramix.cli import app


@pytest.fixture(scope="session")
def checkpoint(llama_dir, llama_experts, tmp_path_factory):
    from conftest import char_tokenizer

    mix = loramix.from_pretrained(
        llama_dir, llama_experts, loramix.MixConfig(gate=loramix.GateConfig(layerwise=True)), tokenizer=char_tokenizer()
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in mix.gate.parameters():
            p.normal_()
    return mix.save(tmp_path_factory.mktemp("cli") / "ckpt")


def _cli(*args):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "loramix", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


runner = CliRunner()


def test_generate_json_and_file(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("GRAVY ACDE\n\nLength of KKLL\nxyz\n")
    result = runner.invoke(
        app, ["generate", str(checkpoint), "--file", str(prompts), "-n", "6", "--json", "--mode", "prompt"]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["GRAVY ACDE", "Length of KKLL", "xyz"]
    assert all(r["mode"] == "prompt" and r["new_tokens"] == 6 and r["finish_reason"] == "length" for r in records)
    # the same completions as the library gives, one prompt at a time
    model = loramix.load(checkpoint)
    ids = model.tokenizer(["xyz"], return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, mode="prompt")
    assert records[2]["completion"] == model.tokenizer.decode(out.new_tokens[0], skip_special_tokens=True)


def test_stream_and_show_scalings(checkpoint):
    import loramix

    model = loramix.load(checkpoint)
    ids = model.tokenizer("GRAVY ACDE", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5)
    want = model.tokenizer.decode(out.new_tokens[0, : out.lengths[0]], skip_special_tokens=True)
    result = runner.invoke(app, ["generate", str(checkpoint), "-p", "GRAVY ACDE", "-n", "5", "--stream"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"GRAVY ACDE{want}\n"  # the streamed text is the greedy answer, piece by piece
    result = runner.invoke(
        app, ["generate", str(checkpoint), "-p", "GRAVY ACDE", "-n", "5", "--show-scalings"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "dominant expert" in result.stdout and "protein" in result.stdout and "qa" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("│ ") and line[2].isdigit()]
    assert len(rows) == 5


def test_info(checkpoint):
    result = runner.invoke(app, ["info", str(checkpoint)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "protein" in result.stdout and "adapted layers: 12" in result.stdout


def test_errors_are_one_line_without_traceback(checkpoint, tmp_path):
    missing = _cli("generate", tmp_path / "nowhere", "-p", "x")
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr and missing.stderr.strip().count("\n") == 0
    assert "nowhere is not a directory (expected a loramix checkpoint)" in missing.stderr
    bad_mode = _cli("generate", checkpoint, "-p", "x", "--mode", "turbo")
    assert bad_mode.returncode == 2 and "unknown mode 'turbo'" in bad_mode.stderr
    negative = _cli("generate", checkpoint, "-p", "x", "-n", "-1")
    assert negative.returncode == 2 and "Invalid value for '--max-new-tokens'" in negative.stderr
    assert "Traceback" not in negative.stderr and negative.stderr.strip().count("\n") == 0
    debug = _cli("--debug", "generate", tmp_path / "nowhere", "-p", "x")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_quickstart_example_runs(tmp_path):
    """examples/quickstart.py, the README's short tour of the API, runs offline as written."""
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "identical logits" in proc.stdout and "scalings [B,T,L,N]" in proc.stdout


def test_train_gate_continues_from_a_checkpoint(checkpoint, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"ab{i}", "completion": "cd"}) + "\n" for i in range(8)))
    out = tmp_path / "continued"
    result = runner.invoke(app, ["train-gate", "--init", str(checkpoint), "--data", str(data), "--out", str(out),
                                 "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--eval-fraction", "0"])
    assert result.exit_code == 0, result.output
    before, after = loramix.load(checkpoint), loramix.load(out)
    assert after.expert_names == before.expert_names and after.config.to_dict() == before.config.to_dict()
    moved = (after.gate.last.weight - before.gate.last.weight).abs().max()
    assert 0 < moved < 0.2  # 3 AdamW steps from the checkpoint's N(0, 1) gate, not a fresh one
    clash = runner.invoke(app, ["train-gate", "--init", str(checkpoint), "--base", "x", "--data", str(data),
                                "--out", str(tmp_path / "never")])
    assert clash.exit_code == 2 and not (tmp_path / "never").exists()


def test_config_fields_are_options_of_the_training_commands():
    """A new config field reaches the command line without an edit: train-gate has one option per field of
    GateConfig (but hidden_size, inferred), MixConfig (but gate), GateObjective and TrainConfig; train-expert one per
    TrainConfig field."""
    import dataclasses

    from loramix.cli import load_command
    from loramix.train import GateObjective, TrainConfig

    commands = {name: load_command(name) for name in ("train-gate", "train-expert")}
    fields = {
        prefix: {f"{prefix}__{f.name}" for f in dataclasses.fields(cls)} - skip
        for prefix, cls, skip in (
            ("gate", loramix.GateConfig, {"gate__hidden_size"}),
            ("mix", loramix.MixConfig, {"mix__gate"}),
            ("objective", GateObjective, set()),
            ("train", TrainConfig, set()),
        )
    }
    gate_params = {p.name for p in commands["train-gate"].params}
    expert_params = {p.name for p in commands["train-expert"].params}
    assert set().union(*fields.values()) <= gate_params and fields["train"] <= expert_params
    assert not fields["gate"] & expert_params


def test_config_options_build_the_config_and_name_the_option():
    """The helper: help from the field's docstring, booleans as --x/--no-x, the values reach the command as one config,
    and a value the config refuses is a usage error naming the option."""
    from dataclasses import dataclass

    import typer

    from loramix.errors import ConfigError
    from loramix.options import config_options

    @dataclass
    class Toy:
        size: int = 3
        """How big it is."""
        loud: bool = False
        """Whether it shouts."""
        tag: str | None = None

        def __post_init__(self):
            if self.size < 1:
                raise ConfigError(f"toy.size={self.size} must be >= 1", field="size")
            if self.size > 9:  # a message that names no field: the error's field names the option
                raise ConfigError("too big", field="size")

    seen = []
    toy_app = typer.Typer()

    @toy_app.command()
    @config_options(Toy, "toy", names={"tag": "--label"})
    def run(name: str = typer.Option("x"), toy: Toy = None) -> None:
        seen.append((name, toy))

    @toy_app.command()
    def other() -> None:  # a second command, so that Typer keeps `run` as a subcommand
        pass

    runner = CliRunner()
    assert runner.invoke(toy_app, ["run", "--size", "5", "--loud", "--label", "t"]).exit_code == 0
    assert seen == [("x", Toy(size=5, loud=True, tag="t"))]
    assert runner.invoke(toy_app, ["run"]).exit_code == 0 and seen[-1] == ("x", Toy())
    shown = runner.invoke(toy_app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "How big it is." in shown and "--no-loud" in shown and "Whether it shouts." in shown
    bad = runner.invoke(toy_app, ["run", "--size", "0"])
    assert bad.exit_code == 2 and "Invalid value for --size: toy.size=0 must be >= 1" in bad.output
    big = runner.invoke(toy_app, ["run", "--size", "10"])
    assert big.exit_code == 2 and "Invalid value for --size: too big" in big.output
    assert "None" not in shown  # a default of None is not offered: it cannot be typed


# ---------------------------------------------------------------------- the help a newcomer reads


def _help(*args):
    return runner.invoke(app, [*args, "--help"], env={"COLUMNS": "300"}, terminal_width=300).output


def test_the_command_list_shows_each_summary_whole_and_it_is_the_commands_own():
    """`loramix --help` lists every command with its whole summary (on one line at this width), and the summary
    cli.COMMANDS holds for the list is the first paragraph of the command's own help (they cannot drift apart)."""
    import inspect

    from loramix.cli import COMMANDS, load_command

    shown = _help()
    for name, (_, summary) in COMMANDS.items():
        assert summary in shown, (name, summary)
        own = inspect.cleandoc(load_command(name).help or "").split("\n\n")[0]
        assert " ".join(own.split()) == summary, name


@pytest.mark.parametrize("command", ["", "generate", "serve", "train-gate", "train-expert", "mix", "analyze",
                                     "converse", "eval", "export", "demo", "info"])
def test_help_shows_no_bool_label_and_never_offers_none(command):
    shown = _help(*([command] if command else []))
    assert "Usage: " in shown and "Options" in shown
    assert "<bool>" not in shown  # a flag takes no value
    assert "[default: None]" not in shown  # None cannot be typed


def test_a_none_the_help_offers_can_be_typed():
    """--max-grad-norm's help says "None: no clipping": the option takes none (any case) for None."""
    from dataclasses import dataclass

    import typer

    from loramix.options import config_options

    line = next(x for x in _help("train-expert").splitlines() if "--max-grad-norm" in x)
    assert "FLOAT|none" in line

    @dataclass
    class Clip:
        norm: float | None = 1.0
        """Gradient clipping norm (None: no clipping)."""

    seen = []
    toy_app = typer.Typer()

    @toy_app.command()
    @config_options(Clip, "clip")
    def run(clip: Clip = None) -> None:
        seen.append(clip)

    @toy_app.command()
    def other() -> None:
        pass

    for given, want in (("None", None), ("none", None), ("0.5", 0.5)):
        assert runner.invoke(toy_app, ["run", "--norm", given]).exit_code == 0
        assert seen[-1] == Clip(norm=want)
    bad = runner.invoke(toy_app, ["run", "--norm", "lots"])
    assert bad.exit_code == 2 and "'lots' is not a float (or none)" in bad.output


def test_help_imports_no_heavy_library():
    """`loramix --help` (and a command list) imports neither torch, transformers, peft nor fastapi; the config
    modules import no torch."""
    script = (
        "import sys\n"
        "sys.argv = ['loramix', '--help']\n"
        "from loramix.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "import loramix.settings, loramix.serve.config\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'fastapi', 'accelerate') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_device_is_one_option_with_one_help():
    """--device is LoadConfig's field: the same help in every command that loads a model."""
    from loramix.cli import load_command

    helps = set()
    for name in ("generate", "serve", "analyze", "converse"):
        option = next(p for p in load_command(name).params if "--device" in getattr(p, "opts", []))
        helps.add(option.help)
    assert len(helps) == 1 and "cuda:1" in helps.pop()


def test_a_port_in_use_is_one_line_before_the_model_loads(checkpoint, monkeypatch, capsys):
    """The README promises exit code 1 for a port in use; the check runs before the model loads (no load here)."""
    import socket

    from loramix import cli
    from loramix.commands import serve

    loaded = []
    monkeypatch.setattr(serve, "load_model", lambda *a, **k: loaded.append(a))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setattr(sys, "argv", ["loramix", "serve", str(checkpoint), "--port", str(port)])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert exit_.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --port {port}: 127.0.0.1:{port} is already in use"), lines
    assert "loading" not in lines[0] and not loaded


@pytest.mark.parametrize(("module", "extra"), [("lm_eval", "eval"), ("ray", "ray"), ("gguf", "smollm2")])
def test_a_missing_extra_names_its_pip_install(module, extra, monkeypatch, capsys, tmp_path):
    from loramix import cli
    from loramix.commands import checkpoints

    def missing(path):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setattr(checkpoints, "read_checkpoint_meta", missing)
    monkeypatch.setattr(sys, "argv", ["loramix", "info", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert exit_.value.code == 1 and lines == [f"error: {module} is not installed: pip install 'loramix[{extra}]'"]


def test_progress_bars_only_on_a_terminal(checkpoint, tmp_path):
    """Off a terminal (stderr a log file) `loramix eval` writes no progress bar: no carriage-return redraws."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"ab{i}", "completion": "cd", "domain": "qa"}) + "\n"
                            for i in range(3)))
    log = tmp_path / "log.txt"
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "loramix", "eval", str(checkpoint), "--data", str(data),
                               "--system", "base"], stdout=subprocess.PIPE, stderr=err, text=True, timeout=300)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert "\r" not in log.read_text() and "evaluating" not in log.read_text()


def test_training_shows_no_progress_bar_off_a_terminal(monkeypatch):
    """train-expert / train-gate: the bar only when stderr is a terminal (metrics.jsonl and the printed metrics
    say how training went in a log)."""
    import io

    from loramix.cli import load_command
    from loramix.commands.train import off_terminal
    from loramix.train import TrainConfig

    load_command("train-gate")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert off_terminal(TrainConfig()).progress is False

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert off_terminal(TrainConfig()).progress is True
