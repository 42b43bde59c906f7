"""The paged KV caches (blocks.py) and the server's memory (serve/engine.py): the allocator and its prefix cache, the
budget taken at start, admission and preemption by blocks, shared prefixes and prompts in chunks, each checked
against the library's own answer. Tiny random Llama (512 bytes a token over both passes), real PEFT experts."""

import pytest
import torch

from loramix import ConfigError
from loramix.blocks import BlockAllocator, block_keys, layout_of, paged_budget, pool_blocks
from loramix.decode import Decoder, RowSpec
from loramix.sampling import SamplingSettings
from loramix.serve import Engine, create_app
from loramix.serve.events import Done
from test_gate_context import context_mix
from test_serve import served_mix
from test_serve_load import make_job

NO_EOS = {2: -100.0}  # char_tokenizer's </s>: rows run to max_tokens


@pytest.fixture(scope="module")
def mix(llama_dir, llama_experts):
    return served_mix(llama_dir, llama_experts)


def block_bytes(mix, block_size=16):
    return layout_of(mix, granular=True).bytes_per_token * block_size


def run(engine, jobs):
    """Submit every (job, sink) at once; their final messages, in order."""
    for job, _ in jobs:
        engine.submit(job)
    return [sink.result for _, sink in jobs]


def test_allocator_counts_references_and_reuses_cached_blocks_least_recently_used_first():
    a = BlockAllocator(4)
    first = [a.allocate() for _ in range(2)]
    assert first == [2, 3] and a.available == 2 and a.used == 2
    keys = block_keys(list(range(40)), 16, b"gated")
    assert len(keys) == 2 and keys != block_keys(list(range(40)), 16, b"fixed")  # the family is in the key
    assert block_keys([1] * 16, 16, b"g") != block_keys([2] + [1] * 15, 16, b"g")
    a.register(first, keys)
    a.release(first)
    assert a.available == 4 and a.used == 0  # cached blocks no row holds are free to take
    assert a.lookup(keys) == first and a.refs[2] == 1 and a.hits == 2  # taken back from the prefix cache
    assert a.lookup(keys[1:]) == [3] and a.refs[3] == 2  # shared: two holders
    a.release([2, 3, 3])
    others = [a.allocate() for _ in range(2)]  # the free blocks go first ...
    assert sorted(others) == [4, 5] and a.lookup(keys[:1]) == [2]
    a.release([2])
    assert a.allocate() == 3  # ... then the idle cached ones, least recently used first (3, not 2)
    assert a.lookup(keys) == [2]  # block 3's key is gone with it: the run stops after block 2
    with pytest.raises(RuntimeError, match="no KV block is free"):
        a.allocate()
    a.forget([2])
    assert keys[0] not in a.cached


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096), (" 1 gib ", 2**30)],
)
def test_budget_sizes_parse(text, expected):
    assert paged_budget(text) == expected


@pytest.mark.parametrize("text", ["", "two", "-1GiB", "0", "2 parsecs", "nanGiB", "infGiB"])
def test_budget_sizes_that_are_not_sizes_name_the_flag(text):
    with pytest.raises(ConfigError, match=r"--kv-cache-memory=.* is not a size; expected e\.g\. 2GiB"):
        paged_budget(text)


def test_the_pool_is_sized_from_the_budget_and_refused_when_it_cannot_be_met(mix):
    layout = layout_of(mix, granular=True)
    assert layout.bytes_per_token == 2 * 2 * 2 * (8 + 8) * 4  # passes x layers x KV heads x (key + value) x float32
    cpu = torch.device("cpu")
    assert pool_blocks(layout, cpu, rows=8, longest=100, kv_cache_memory=10 * 8192) == 10
    assert pool_blocks(layout, cpu, rows=2, longest=100, kv_cache_memory=2**30) == 2 * 2 * 7  # capped: 2 x rows
    with pytest.raises(
        ConfigError,
        match=r"--kv-cache-memory=40.00KiB holds 80 tokens .* fewer than one request of "
        r"100 tokens .* give at least 56.00KiB or lower --max-model-len",
    ):
        pool_blocks(layout, cpu, rows=8, longest=100, kv_cache_memory=5 * 8192)
    with pytest.raises(ConfigError, match=r"--kv-cache-memory=1024.00GiB is above the free memory .* would fit"):
        pool_blocks(layout, cpu, rows=2**20, longest=2**20, kv_cache_memory=2**40)


def test_the_server_allocates_its_pool_at_start_and_refuses_what_can_never_fit(mix):
    app = create_app(mix, max_tokens_limit=64, max_model_len=100, kv_cache_memory="80KiB")
    engine = app.state.engine
    assert engine.blocks == {"total": 10, "used": 0, "free": 10}
    assert engine.decoder.paged.mixed[0][0].shape == ((10 + 2) * 16, 2, 8)  # allocated now, before any request
    assert "10 blocks of 16 tokens = 160 tokens" in engine.pool_line
    engine.close()
    with pytest.raises(ConfigError, match=r"--max-model-len=129 is above the model's context of 128 tokens"):
        create_app(mix, max_model_len=129)
    with pytest.raises(ConfigError, match=r"--kv-cache-memory=.* holds 32 tokens .* fewer than one request of 100"):
        create_app(mix, max_tokens_limit=64, max_model_len=100, kv_cache_memory=2 * 8192)


def test_rows_preempted_when_the_pool_runs_out_give_the_library_answers(mix):
    """Four rows that each grow to three blocks share a pool of five: rows are preempted and recomputed, and every
    answer (greedy text and logprobs, a seeded sample with a penalty, prompt-mode rows that hold their scalings) is
    the one it gets alone."""
    engine = Engine(mix, max_batch=4, longest=48, kv_cache_memory=5 * block_bytes(mix))
    alone = Engine(mix, max_batch=1, longest=48)
    try:
        prompts = ["GRAVY of ACDK", "KKLL", "MWWAC", "design"]
        settings = [
            dict(logprobs=2),
            dict(logprobs=2, mode="prompt"),
            dict(temperature=1.3, seed=7, frequency_penalty=0.5),
            dict(mode="prompt"),
        ]
        jobs = [make_job(mix, p, max_tokens=36, logit_bias=NO_EOS, **s) for p, s in zip(prompts, settings)]
        results = run(engine, jobs)
        assert engine.preemptions > 0 and engine.blocks["used"] == 0
        for prompt, got, kwargs in zip(prompts, results, settings):
            want = run(alone, [make_job(mix, prompt, max_tokens=36, logit_bias=NO_EOS, **kwargs)])[0]
            assert isinstance(got, Done) and got.text == want.text and got.completion_tokens == 36
            if "logprobs" in kwargs:
                for a, b in zip(got.logprobs.completion, want.logprobs.completion):
                    assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-5
                    assert [t for t, _ in a.top] == [t for t, _ in b.top]
    finally:
        engine.close()
        alone.close()


def _shared_prefix_answers(mix, prompts, mode, **engine_kwargs):
    """Each prompt through an engine one after another (so that a later one finds the earlier ones' blocks):
    (results, prefix-cache hits)."""
    engine = Engine(mix, max_batch=2, longest=120, **engine_kwargs)
    try:
        results = [run(engine, [make_job(mix, p, max_tokens=8, mode=mode, logprobs=1)])[0] for p in prompts]
        return results, engine.decoder.allocator.hits
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["granular", "prompt"])
def test_shared_prefixes_are_reused_exactly(mix, mode):
    system = "You are a protein chemist. GRAVY of ACDKLMNPQ is computed from the residues. "
    prompts = [system + "KKLL?", system + "MW?", system[:40] + "other"]
    shared, hits = _shared_prefix_answers(mix, prompts, mode)
    alone, none = _shared_prefix_answers(mix, prompts, mode, prefix_caching=False)
    assert len(mix.tokenizer(system).input_ids) // 16 == 4 and len(mix.tokenizer(system[:40]).input_ids) // 16 == 2
    assert hits == 4 + 2 and none == 0  # the system prompt's 4 full blocks for the second, 2 for the third
    for a, b in zip(shared, alone):
        assert a.text == b.text
        for x, y in zip(a.logprobs.completion, b.logprobs.completion):
            assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-5


@pytest.mark.parametrize("context", ["attention", "ema"])
def test_context_gates_under_paging_sharing_and_chunks(llama_dir, llama_experts, context):
    """An attention gate's keys are paged and shared like the KV caches; an EMA gate's state at a block's end is
    not kept, so its rows never start from a cached prefix. Both give the library's answers in chunks too."""
    mix = context_mix(llama_dir, llama_experts, context)
    prompt = "You are a protein chemist. GRAVY of ACDKLMNPQ is "
    engine = Engine(mix, max_batch=2, longest=120, max_num_batched_tokens=16)
    try:
        first, second = (
            run(engine, [make_job(mix, prompt + q, max_tokens=8, logit_bias=NO_EOS)])[0] for q in ("K", "W")
        )
        assert (engine.decoder.allocator.hits > 0) == (context == "attention")
        for q, got in (("K", first), ("W", second)):
            out = mix.generate(
                torch.tensor([mix.tokenizer(prompt + q).input_ids]),
                max_new_tokens=8,
                sampling=SamplingSettings(logit_bias=NO_EOS),
            )
            assert got.text == mix.tokenizer.decode(out.new_tokens[0].tolist(), skip_special_tokens=True)
    finally:
        engine.close()


def test_a_long_prompt_enters_in_chunks_while_a_row_streams(mix):
    """A 100-token prompt joins in 16-token pieces between the steps of a streaming row: both answers are the
    library's, and the streaming row got tokens while the long prompt was entering."""
    engine = Engine(mix, max_batch=2, longest=120, max_num_batched_tokens=16, prefix_caching=False)
    extend, at_steps = engine.decoder.extend, []

    def counted(p, n):
        at_steps.append(engine.decoder.steps)
        return extend(p, n)

    engine.decoder.extend = counted
    try:
        streaming, sink = make_job(mix, "KKLL", max_tokens=40, logit_bias=NO_EOS, stream=True)
        engine.submit(streaming)
        assert sink.started.wait(30)
        long_prompt = ("ACDEFGHIKLMNPQRSTVWY" * 5)[:100]
        long, long_sink = make_job(mix, long_prompt, max_tokens=6, logit_bias=NO_EOS)
        engine.submit(long)
        got_long, got_stream = long_sink.result, sink.result
        assert engine.batches == 2  # the long one joined on its own, in pieces ...
        assert len(at_steps) == 7 and at_steps == sorted(set(at_steps))  # ... with a decode step between pieces
        for job, got, n in ((streaming, got_stream, 40), (long, got_long, 6)):
            out = mix.generate(torch.tensor([job.ids]), max_new_tokens=n, sampling=SamplingSettings(logit_bias=NO_EOS))
            assert got.text == mix.tokenizer.decode(out.new_tokens[0].tolist(), skip_special_tokens=True)
    finally:
        engine.close()


def test_a_failed_row_zeroes_only_the_blocks_it_holds_alone(mix):
    """A row that failed (non-finite values) has its blocks zeroed, but not the cached prefix another row reads."""
    decoder = Decoder(mix, 2, 128, blocks=16, prefix_cache=True)
    ids = mix.tokenizer("You are a protein chemist. GRAVY of ACDKLMN").input_ids
    assert len(ids) > 32
    decoder.place(len(ids), 4)
    decoder.join([0], torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [RowSpec(max_new_tokens=4)])
    p = decoder.begin(1, ids + [5], RowSpec(max_new_tokens=4))
    assert p.cached == 32 and p.table == decoder.rows[0].table[:2]
    decoder.extend(p, 100)
    decoder.place(len(p.ids), 4)
    decoder.finish(p)
    pool = decoder.paged.mixed[0][0]
    shared, own = decoder.rows[1].table[0], decoder.rows[0].table[-1]
    before = pool[shared * 16 : (shared + 1) * 16].clone()
    assert pool[own * 16 : own * 16 + 1].any()
    decoder.leave(0, failed=True)
    assert torch.equal(pool[shared * 16 : (shared + 1) * 16], before)
    assert not pool[own * 16 : (own + 1) * 16].any() and own in decoder.allocator.free


def test_prompts_with_a_cached_prefix_join_together_before_the_next_step(mix):
    """Requests sharing a cached system prompt each take one forward of their rest and all join before the next
    decode step (not one per step), and answer as without the cache."""
    system = "You are a protein chemist. GRAVY of ACDKLMNPQ is computed from the residues. "
    engine = Engine(mix, max_batch=4, longest=120)
    finish, at_steps = engine.decoder.finish, []

    def counted(p):
        at_steps.append(engine.decoder.steps)
        return finish(p)

    engine.decoder.finish = counted
    try:
        run(engine, [make_job(mix, system + "K?", max_tokens=4)])
        with engine._cond:  # submitted together: none may be admitted before the others are queued
            jobs = [make_job(mix, system + q, max_tokens=6, logit_bias=NO_EOS) for q in ("KK?", "MW?", "AC?")]
            for job, _ in jobs:
                engine._pending.append(job)
            engine._cond.notify()
        results = [sink.result for _, sink in jobs]
        assert len(at_steps) == 3 and len(set(at_steps)) == 1
        for (job, _), got in zip(jobs, results):
            out = mix.generate(torch.tensor([job.ids]), max_new_tokens=6, sampling=SamplingSettings(logit_bias=NO_EOS))
            assert got.text == mix.tokenizer.decode(out.new_tokens[0].tolist(), skip_special_tokens=True)
    finally:
        engine.close()
