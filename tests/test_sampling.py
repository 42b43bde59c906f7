"""The batched sampler (sampling.py): its filters and penalties against transformers' processors and hand-computed
values, per-row settings in one batch, seeded rows independent of their batch, and settings refused once."""

import pytest
import torch

from loramix import ConfigError
from loramix.sampling import Sampler, SamplingSettings


def _sampler(rows, vocab=8, prompts=None):
    sampler = Sampler(len(rows), vocab, torch.device("cpu"))
    for i, (settings, generator) in enumerate(rows):
        prompt = torch.tensor(prompts[i] if prompts else [0])
        sampler.set_row(i, settings, prompt, generator)
    return sampler


def test_top_k_and_top_p_keep_what_transformers_warpers_keep():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(6, 50) * 3
    top_k = torch.tensor([50, 5, 1, 50, 10, 3])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.3, 0.95, 0.999])
    ours = Sampler._filter(scores, top_k, top_p)
    for row in range(6):
        want = scores[row : row + 1]
        if int(top_k[row]) < 50:
            want = TopKLogitsWarper(int(top_k[row]))(None, want)
        if float(top_p[row]) < 1.0:
            want = TopPLogitsWarper(float(top_p[row]))(None, want)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(want[0])), row


def test_penalties_and_bias_as_computed_by_hand():
    # row 0: presence 0.5 and frequency 0.25 over the generated tokens; row 1: repetition penalty 2 over prompt and
    # generated tokens; row 2: a logit bias. Greedy rows, so the scores decide the argmax; read them from choose().
    settings = [
        SamplingSettings(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingSettings(repetition_penalty=2.0),
        SamplingSettings(logit_bias={3: -100.0, 5: 2.5}),
        SamplingSettings(repetition_penalty=2.0),
    ]
    sampler = _sampler([(s, None) for s in settings], vocab=6, prompts=[[4], [4], [4], [4]])
    sampler.record([0, 1, 2, 3], torch.tensor([1, 1, 1, 2]))
    sampler.record([0, 1, 2, 3], torch.tensor([1, 2, 1, 2]))
    logits = torch.tensor(
        [
            [0.0, 1.2, 0.5, 0.0, 0.0, 0.0],
            [0.0, 3.0, -1.0, 0.0, 2.0, 1.6],
            [0, 0, 0, 9.0, 0, 0],
            [-9, -9, -1.0, -9, -9, -1.5],
        ]
    )
    # row 0: token 1 seen twice: 1.2 - 0.5 - 0.5 = 0.2 < 0.5 -> token 2
    # row 1: 3.0 / 2 = 1.5 (generated), 2.0 / 2 = 1.0 (prompt), -1 * 2 (generated) -> token 5 (1.6)
    # row 2: 9 - 100 for token 3, 0 + 2.5 for token 5 -> token 5
    # row 3: a negative logit is multiplied: token 2 -1 * 2 = -2 < -1.5 -> token 5
    assert sampler.choose(logits, slice(0, 4)).tolist() == [2, 5, 5, 5]


def test_a_seeded_row_samples_the_same_alone_and_in_any_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 40)
    seeded = SamplingSettings(temperature=1.5, top_p=0.9, seed=11)

    def row_alone():
        sampler = _sampler([(seeded, torch.Generator().manual_seed(11))], vocab=40)
        return [int(sampler.choose(logits[2:3], slice(0, 1))[0]) for _ in range(20)]

    def row_in_batch():
        others = [(SamplingSettings(temperature=0.7), None), (SamplingSettings(), None)]
        sampler = _sampler([*others, (seeded, torch.Generator().manual_seed(11)), others[0]], vocab=40)
        return [int(sampler.choose(logits, slice(0, 4))[2]) for _ in range(20)]

    alone = row_alone()
    assert alone == row_in_batch() and len(set(alone)) > 1  # it samples, and the batch changes nothing


def test_greedy_rows_are_argmax_beside_sampled_rows():
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    rows = [(SamplingSettings(), None), (SamplingSettings(temperature=5.0), None), (SamplingSettings(), None)]
    sampler = _sampler(rows, vocab=30)
    for _ in range(10):
        tokens = sampler.choose(logits, slice(0, 3))
        assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_a_temperature_below_the_epsilon_is_greedy():
    assert SamplingSettings(temperature=1e-300).greedy and SamplingSettings(temperature=0).greedy
    assert not SamplingSettings(temperature=1e-3).greedy
    logits = torch.tensor([[0.0, 1.0, 0.99]])
    sampler = _sampler([(SamplingSettings(temperature=1e-300), None)], vocab=3)
    assert sampler.choose(logits, slice(0, 1)).tolist() == [1]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(temperature=float("nan")), r"temperature=nan must be a finite number"),
        (dict(temperature=-1.0), r"temperature=-1.0 must be >= 0"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_k=-2), r"top_k=-2 must be an integer >= 0"),
        (dict(repetition_penalty=1e-300), r"repetition_penalty=1e-300 must be in \[0.01, 100\]"),
        (dict(presence_penalty=3.0), r"presence_penalty=3.0 must be in \[-2, 2\]"),
        (dict(frequency_penalty=float("inf")), r"frequency_penalty=inf must be a finite number"),
        (dict(logit_bias={4: 1e9}), r"logit_bias\[4\]=1000000000.0 must be in \[-100, 100\]"),
        (dict(logit_bias={-1: 1.0}), r"logit_bias: key -1 must be a token id"),
    ],
)
def test_settings_that_cannot_be_computed_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        SamplingSettings(**fields)
