"""Scalings analysis: numbers from hand-set gates, the tidy table, figures, conversations, CLI."""

import json
import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import loramix
import loramix.errors
from loramix.analysis import ScalingStats, analyze, token_entropy
from loramix.analysis.converse import converse
from loramix.cli import app

from conftest import char_tokenizer

RECORDS = [
    {"prompt": "GRAVY of ACDK", "completion": " -0.2", "domain": "forward"},
    {"prompt": "Design 12", "completion": " MKKLL", "domain": "design"},
    {"text": "What is K? Lysine.", "domain": "qa"},
    {"prompt": "1+2=", "completion": "3", "domain": "design"},
]


def _model(llama_dir, llama_experts):
    return loramix.from_pretrained(
        llama_dir, llama_experts, loramix.MixConfig(gate=loramix.GateConfig(layerwise=True)), tokenizer=char_tokenizer()
    )


def _constant_gate(mix) -> torch.Tensor:
    """Gate weights 0, biases set per layer: every token gets the same known scalings p [L, N]."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(mix.n_layers, mix.n_experts, generator=g) * 2
    with torch.no_grad():
        mix.gate.last.weight.zero_()
        mix.gate.last.bias.copy_(logits.flatten())
    return torch.softmax(logits, -1).double()


def test_usage_entropy_dominance_from_a_hand_set_gate(llama_dir, llama_experts, tmp_path):
    mix = _model(llama_dir, llama_experts)
    p = _constant_gate(mix)
    summary = analyze(mix, tmp_path, records=RECORDS, fmt="csv", progress=False)
    tokens = {"forward": 1 + 13 + 5 + 1, "design": (1 + 9 + 6 + 1) + (1 + 4 + 1 + 1), "qa": 1 + 18 + 1}
    for domain, n in tokens.items():
        group = summary["groups"][domain]
        assert group["tokens"] == n
        for i, layer in enumerate(mix.layer_names):
            for e, name in enumerate(mix.expert_names):
                assert group["usage_by_layer"][layer][name] == pytest.approx(float(p[i, e]), abs=1e-6)
        for e, name in enumerate(mix.expert_names):
            assert group["usage"][name] == pytest.approx(float(p[:, e].mean()), abs=1e-6)
        entropy = float((-(p * p.log()).sum(-1)).mean())
        assert group["mean_token_entropy"] == pytest.approx(entropy, abs=1e-6)
        winner = mix.expert_names[int(p.mean(0).argmax())]
        assert group["dominance"][winner] == 1.0
    assert summary["groups"]["all"]["tokens"] == sum(tokens.values())
    # every token has the same scalings, so two layers correlate as their rows p_i, p_j do over the experts
    want = torch.corrcoef(p)
    got = torch.tensor(summary["layer_correlation"], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_correlation_of_copied_and_negated_gate_rows(llama_dir, tmp_path):
    from conftest import make_adapter

    experts = {
        n: make_adapter(llama_dir, tmp_path / n, targets=["q_proj", "v_proj"], seed=s) for n, s in (("a", 1), ("b", 2))
    }
    mix = _model(llama_dir, experts)
    n = mix.n_experts  # 2 experts: softmax(-x) = 1 - softmax(x)
    with torch.no_grad():
        w = mix.gate.last.weight.view(mix.n_layers, n, -1)
        b = mix.gate.last.bias.view(mix.n_layers, n)
        w[1], b[1] = w[0], b[0]  # layer 1 copies layer 0
        w[2], b[2] = -w[0], -b[0]  # layer 2 mirrors it
    summary = analyze(mix, tmp_path / "out", records=RECORDS, fmt="csv", progress=False)
    corr = summary["layer_correlation"]
    assert corr[0][1] == pytest.approx(1.0, abs=1e-6)
    # per (token, expert) value x, layer 2 has 1 - x for expert 0 and x' = 1 - ... : over both experts the values of
    # layer 2 are those of layer 0 with the experts swapped, which is a permutation: corr with itself stays 1 on the
    # diagonal and the (0, 2) entry is -1 for each expert column, hence overall -1
    assert corr[0][2] == pytest.approx(-1.0, abs=1e-6)


def test_stats_accumulate_like_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    stats = ScalingStats(5, 3)
    chunks = [torch.softmax(torch.randn(t, 5, 3, generator=g), -1) for t in (4, 9, 1)]
    for c in chunks:
        stats.add(c, "d")
    full = torch.cat(chunks).double()
    torch.testing.assert_close(stats.usage("d"), full.mean(0))
    x = full.permute(0, 2, 1).reshape(-1, 5)
    want = torch.corrcoef(x.T)
    torch.testing.assert_close(stats.layer_correlation(), want, rtol=1e-6, atol=1e-6)
    entropy = token_entropy(full)
    assert stats.summary(["a", "b", "c"], list("vwxyz"))["groups"]["d"]["mean_token_entropy"] == pytest.approx(
        float(entropy.mean())
    )


def test_table_rows_and_figures(llama_dir, llama_experts, tmp_path):
    import pyarrow.parquet as pq

    mix = _model(llama_dir, llama_experts)
    summary = analyze(
        mix, tmp_path, prompts=["GRAVY of ACDKLMNPQRSTVWY" * 4], records=RECORDS, max_new_tokens=5, progress=False
    )
    table = pq.read_table(tmp_path / "scalings.parquet").to_pandas()
    assert list(table.columns) == [
        "sequence",
        "domain",
        "source",
        "turn",
        "token_index",
        "token",
        "layer",
        "layer_name",
        "expert",
        "value",
    ]
    assert len(table) == summary["groups"]["all"]["tokens"] * mix.n_layers * mix.n_experts
    prompt_rows = table[table.sequence == "prompt-0"]
    assert set(prompt_rows.source) == {"prompt", "generated"}
    assert (prompt_rows.source == "generated").sum() == 5 * mix.n_layers * mix.n_experts
    # the values are the model's scalings
    ids = mix.tokenizer(RECORDS[2]["text"], return_tensors="pt").input_ids[0].tolist() + [2]
    with torch.no_grad():
        s = mix.compute_scalings(torch.tensor([ids]))[0]
    rows = table[(table.sequence == "2") & (table.token_index == 4) & (table.layer == 3)]
    assert rows.expert.tolist() == mix.expert_names
    assert rows.value.tolist() == pytest.approx(s[4, 3].tolist(), abs=1e-6)
    from loramix.analysis.collect import token_labels

    assert rows.token.tolist() == [token_labels(mix.tokenizer, ids)[4]] * mix.n_experts
    for name in summary["figures"]:
        path = tmp_path / name
        assert path.stat().st_size > 2000, name
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stems = {p.rsplit(".", 1)[0] for p in summary["figures"]}
    assert {
        "figures/prompt-0-layers-tokens",
        "figures/prompt-0-tokens-experts",
        "figures/usage-by-domain",
        "figures/layer-correlation",
        "figures/domain-forward-0-layers-tokens",
    } <= stems
    assert json.loads((tmp_path / "summary.json").read_text())["texts"][0]["completion"] is not None


def test_long_prompts_are_binned():
    from loramix.analysis.plots import bin_tokens

    s = torch.arange(100.0)[:, None, None].expand(100, 2, 3)
    binned, labels = bin_tokens(s, [str(i) for i in range(100)], 30)
    assert binned.shape[0] == 25 and labels[0] == "0-3 0…"
    assert binned[0, 0, 0] == pytest.approx(1.5)


def _drawn_figures(monkeypatch):
    """The figures the plot functions make, drawn and kept open (instead of saved), for checks of their layout."""
    from loramix.analysis import plots

    figures = []

    def keep(fig, stem):
        fig.canvas.draw()
        figures.append(fig)
        return []

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def _box(artist, fig):
    """An artist's drawn extent in inches: (left, bottom, right, top)."""
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return box.x0 / fig.dpi, box.y0 / fig.dpi, box.x1 / fig.dpi, box.y1 / fig.dpi


def test_layer_token_figure_has_no_empty_band_and_one_colour_bar_beside_the_panels(monkeypatch, tmp_path):
    """The SmolLM2 shape (150 adapted modules, 5 experts): the panels start right under the title, and one colour
    bar stands right of the panels, exactly as tall as they are together (not a bar in the middle of the figure)."""
    from loramix.analysis.plots import plot_layer_token_heatmaps

    figures = _drawn_figures(monkeypatch)
    layers = [f"model.layers.{i // 5}.self_attn.{p}" for i, p in zip(range(150), ["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj", "gate_proj"] * 30)]
    scalings = torch.softmax(torch.randn(40, 150, 5, generator=torch.Generator().manual_seed(0)), -1)
    plot_layer_token_heatmaps(scalings, [f"t{i}" for i in range(40)], list("abcde"), layers, tmp_path / "x")
    fig = figures[0]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(bars) == 1 and len(panels) == 5
    bar = _box(bars[0], fig)
    top = _box(panels[0], fig)
    bottom = _box(panels[-1], fig)
    assert bar[0] > max(_box(p, fig)[2] for p in panels)  # beside the panels
    assert bar[3] == pytest.approx(top[3], abs=0.05) and bar[1] == pytest.approx(bottom[1], abs=0.05)
    assert bar[2] - bar[0] < 0.4  # a bar, not a block
    title = _box(fig._suptitle, fig)
    panel_title = _box(panels[0].title, fig)
    assert title[1] - panel_title[3] < 0.4  # no empty band between the figure's title and the first panel
    assert fig.get_size_inches()[1] < 20


def test_square_figure_colour_bar_is_as_tall_as_the_image(monkeypatch, tmp_path):
    """The correlation matrix keeps its aspect: its colour bar matches the drawn image, not the figure's height."""
    from loramix.analysis.plots import plot_layer_correlation

    figures = _drawn_figures(monkeypatch)
    plot_layer_correlation(torch.eye(150), [f"model.layers.{i}.mlp.up_proj" for i in range(150)], tmp_path / "c")
    fig = figures[0]
    (ax,) = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    bars = [a for a in [*fig.axes, *ax.child_axes] if a is not ax]
    assert len(bars) == 1
    image, bar = _box(ax, fig), _box(bars[0], fig)
    assert bar[1] == pytest.approx(image[1], abs=0.02) and bar[3] == pytest.approx(image[3], abs=0.02)
    assert bar[0] > image[2]


def test_conversation_trajectory(llama_dir, llama_experts, tmp_path):
    mix = _model(llama_dir, llama_experts)
    record = converse(
        mix,
        tmp_path,
        persona_a="Protein chemist.",
        persona_b="Sceptic.",
        opening="Is K charged?",
        turns=3,
        max_new_tokens=6,
        summary_prompt="Summarise.",
        fmt="csv",
        eos_token_id=[],
    )
    assert [t["agent"] for t in record["turns"]] == ["A", "B", "A", "A"] and record["turns"][-1]["summary"]
    assert all(t["tokens"] == 6 for t in record["turns"])
    table = pd.concat([pd.read_csv(tmp_path / f"agent-{a}" / "scalings.csv") for a in "AB"])
    for t in record["turns"]:  # each turn's mean scalings are those the table recorded for its tokens
        rows = table[table.turn == t["turn"]]
        assert len(rows) == 6 * mix.n_layers * mix.n_experts
        mean = rows.groupby("expert").value.mean()
        assert t["mean_scalings"] == pytest.approx({e: mean[e] for e in mix.expert_names}, abs=1e-6)
    assert (tmp_path / "figures" / "trajectory.png").stat().st_size > 5000
    assert (tmp_path / "transcript.md").read_text().startswith("# Conversation")
    rows = (tmp_path / "agent-B" / "scalings.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 * mix.n_layers * mix.n_experts


def test_cli_analyze_and_converse(llama_dir, llama_experts, tmp_path):
    mix = _model(llama_dir, llama_experts)
    ckpt = mix.save(tmp_path / "ckpt")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "analyze",
            str(ckpt),
            "--data",
            str(data),
            "--prompt",
            "ACDK",
            "-n",
            "3",
            "--out",
            str(tmp_path / "a"),
            "--format",
            "csv",
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "mean scaling per expert" in result.stdout and (tmp_path / "a" / "scalings.csv").is_file()
    result = runner.invoke(
        app,
        [
            "converse",
            str(ckpt),
            "--opening",
            "Hi",
            "--turns",
            "2",
            "-n",
            "4",
            "--out",
            str(tmp_path / "c"),
            "--format",
            "csv",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "c" / "transcript.json").read_text())["turns"][1]["agent"] == "B"
    assert math.isfinite(json.loads((tmp_path / "a" / "summary.json").read_text())["groups"]["qa"]["usage"]["qa"])


def test_conversation_relays(llama_dir, llama_experts, tmp_path, monkeypatch):
    """relay_a / relay_b phrase each agent's turn for the other (the designer's peptide reaches the critic as a
    question); without a relay the turn is passed verbatim, and B hears the opening."""
    from loramix.analysis import converse as module

    mix = _model(llama_dir, llama_experts)
    seen = []
    real = module.encode_prompts

    def spy(tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        return real(tokenizer, prompts, **kwargs)

    monkeypatch.setattr(module, "encode_prompts", spy)
    record = converse(mix, tmp_path / "relayed", opening="OPEN", turns=3, max_new_tokens=3, fmt="csv",
                      eos_token_id=[], relay_a="Q[{text}]", relay_b="R[{text}]")
    a1, b2, _ = (t["text"] for t in record["turns"])
    assert f"Q[{a1}]" in seen[1] and "OPEN" not in seen[1]
    assert f"R[{b2}]" in seen[2] and f"Q[{a1}]" not in seen[2] and "OPEN" in seen[2]
    assert record["relays"] == {"A": "Q[{text}]", "B": "R[{text}]"}
    seen.clear()
    converse(mix, tmp_path / "verbatim", opening="OPEN", turns=2, max_new_tokens=3, fmt="csv", eos_token_id=[])
    assert "OPEN" in seen[1] and "Q[" not in seen[1]
    with pytest.raises(loramix.errors.ConfigError, match="relay_a"):
        converse(mix, tmp_path / "bad", opening="OPEN", turns=2, relay_a="no placeholder")
