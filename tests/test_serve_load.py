"""Serving at load: continuous batching (joining, leaving, per-row settings, seeds and modes), cancellation,
the bounded queue (503), the body guard (413/408), timeouts and /metrics. Tiny random Llama, real PEFT experts."""

import dataclasses
import itertools
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from loramix.sampling import SamplingSettings
from loramix.serve import Engine, Job, create_app
from loramix.serve.events import Done, Failed, Piece
from test_serve import Server, _free_port, _greedy, served_mix

EOS = 2  # char_tokenizer's </s>
NO_EOS = {EOS: -100.0}  # long jobs run to max_tokens


@pytest.fixture(scope="module")
def mix(llama_dir, llama_experts):
    return served_mix(llama_dir, llama_experts)


@contextmanager
def slow(mix, seconds=0.01):
    """Every forward of the mixed model sleeps: a generation takes long enough to hang up or queue behind it."""
    handle = mix.model.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


def wait_for(condition, limit=30.0):
    """Poll until condition() holds (a bound against hanging, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


_order = itertools.count()


class Sink:
    """A job's emit: collects its messages; `finished_at` orders the jobs by when they ended."""

    def __init__(self) -> None:
        self.messages: list = []
        self.done = threading.Event()
        self.started = threading.Event()
        self.finished_at = None

    def __call__(self, message) -> None:
        self.messages.append(message)
        if isinstance(message, Piece):
            self.started.set()
        if isinstance(message, (Done, Failed)):
            self.finished_at = next(_order)
            self.done.set()

    @property
    def result(self):
        assert self.done.wait(60), "the job never finished"
        return self.messages[-1]


SAMPLING = {f.name for f in dataclasses.fields(SamplingSettings)}


def make_job(mix, prompt, **kwargs):
    """A job and its sink; the sampling fields among kwargs make its SamplingSettings."""
    sink = Sink()
    kwargs.setdefault("max_tokens", 8)
    sampling = SamplingSettings(**{k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING})
    return Job(ids=mix.tokenizer(prompt).input_ids, emit=sink, sampling=sampling, **kwargs), sink


def run_alone(mix, prompt, **kwargs) -> dict:
    engine = Engine(mix, max_batch=4)
    try:
        job, sink = make_job(mix, prompt, **kwargs)
        engine.submit(job)
        return sink.result
    finally:
        engine.close()


def test_a_short_request_joins_a_running_long_one_and_both_equal_the_library(mix):
    engine = Engine(mix, max_batch=4)
    try:
        with slow(mix, 0.002):
            long, long_sink = make_job(mix, "GRAVY of ACDK", max_tokens=60, stream=True, logit_bias=NO_EOS)
            engine.submit(long)
            assert long_sink.started.wait(30)
            short, short_sink = make_job(mix, "KKLL", max_tokens=4)
            engine.submit(short)
            short_result, long_result = short_sink.result, long_sink.result
        assert short_sink.finished_at < long_sink.finished_at  # it did not wait for the long one
        assert short_result.text == _greedy(mix, short.ids, 4)[0]
        assert long_result.completion_tokens == 60
        # the long one, alone in the library with the same bias
        out = mix.generate(torch.tensor([long.ids]), max_new_tokens=60, sampling=SamplingSettings(logit_bias=NO_EOS))
        want = mix.tokenizer.decode(out.new_tokens[0].tolist(), skip_special_tokens=True)
        assert long_result.text == want
    finally:
        engine.close()


def test_a_finished_row_frees_its_slot_at_once(mix):
    engine = Engine(mix, max_batch=2)
    try:
        with slow(mix, 0.002):
            long, long_sink = make_job(mix, "GRAVY", max_tokens=50, stream=True, logit_bias=NO_EOS)
            engine.submit(long)
            assert long_sink.started.wait(30)
            sinks = []
            for prompt in ("A", "KK", "W"):  # one slot left: each short job takes it after the one before
                job, sink = make_job(mix, prompt, max_tokens=3, logit_bias=NO_EOS)
                engine.submit(job)
                sinks.append(sink)
            results = [s.result for s in sinks]
            assert long_sink.result.completion_tokens == 50
        assert all(s.finished_at < long_sink.finished_at for s in sinks)
        assert [r.completion_tokens for r in results] == [3, 3, 3]
    finally:
        engine.close()


SETTINGS = [
    ("ACDK", dict(max_tokens=12)),  # greedy, granular
    ("ACDK", dict(max_tokens=12, mode="prompt")),  # held scalings in the same batch
    ("MKTAYIAKQ", dict(max_tokens=10, temperature=1.3, top_p=0.9, seed=7)),
    ("MKTAYIAKQ", dict(max_tokens=10, temperature=0.7, top_k=5, seed=7, mode="prompt")),
    ("GRAVY", dict(max_tokens=10, repetition_penalty=1.5)),
    ("12+3=", dict(max_tokens=10, presence_penalty=0.5, frequency_penalty=1.0, logprobs=2)),
    ("xyz", dict(max_tokens=12, stops=["C"], return_scalings="expert")),
]


def test_per_row_settings_seeds_and_modes_in_one_batch_equal_each_request_alone(mix):
    alone = [run_alone(mix, prompt, **kwargs) for prompt, kwargs in SETTINGS]
    engine = Engine(mix, max_batch=len(SETTINGS))
    try:
        with slow(mix, 0.002):
            blocker, blocker_sink = make_job(mix, "W", max_tokens=30, stream=True, logit_bias=NO_EOS)
            engine.submit(blocker)  # other rows are mid-generation when these join (other columns, other neighbours)
            assert blocker_sink.started.wait(30)
            made = [make_job(mix, prompt, **kwargs) for prompt, kwargs in SETTINGS]
            engine.submit_group([job for job, _ in made])
            together = [sink.result for _, sink in made]
    finally:
        engine.close()
    for a, b in zip(alone, together):
        assert isinstance(b, Done)
        assert (a.text, a.finish_reason, a.completion_tokens) == (
            b.text,
            b.finish_reason,
            b.completion_tokens,
        )
    # the modes against the library: granular and prompt-mode greedy rows shared one batch
    ids = mix.tokenizer("ACDK").input_ids
    assert together[0].text == _greedy(mix, ids, 12)[0]
    out = mix.generate(torch.tensor([ids]), max_new_tokens=12, mode="prompt")
    want = mix.tokenizer.decode(out.new_tokens[0, : out.lengths[0]].tolist(), skip_special_tokens=True)
    assert together[1].text == want and together[0].text != together[1].text
    assert "C" not in together[6].text and len(together[6].scalings) == mix.n_experts
    # the same logprobs alone and in a batch, to float tolerance (not bitwise: see docs/serving.md)
    got = [e.logprob for e in together[5].logprobs.completion]
    want = [e.logprob for e in alone[5].logprobs.completion]
    assert got == pytest.approx(want, abs=1e-5)


def test_cancelled_job_frees_its_slot_within_one_step(mix):
    engine = Engine(mix, max_batch=2)
    try:
        with slow(mix, 0.002):
            job, sink = make_job(mix, "GRAVY", max_tokens=100, stream=True, logit_bias=NO_EOS)
            engine.submit(job)
            assert sink.started.wait(30)
            job.cancelled = True
            at = engine.steps
            wait_for(lambda: engine.active == 0)
            assert engine.steps - at <= 1
        # a cancelled job gets one final message (its handler never waits forever), and no more text
        assert sink.result == Failed(0, "the client closed the request", 499)
        assert sum(isinstance(m, Failed) for m in sink.messages) == 1
        assert sum(isinstance(m, Piece) for m in sink.messages) < 50
    finally:
        engine.close()


def test_mixed_held_and_granular_rows_shift_along_the_cache(mix):
    """A long prompt joining short running rows moves them along the cache; a tiny cache forces it."""
    engine = Engine(mix, max_batch=3, cache_len=64)
    try:
        with slow(mix, 0.002):
            first, first_sink = make_job(mix, "A", max_tokens=30, stream=True, logit_bias=NO_EOS)
            engine.submit(first)
            assert first_sink.started.wait(30)
            late, late_sink = make_job(mix, "MKTAYIAKQRQISFVKSHFSRQ", max_tokens=20, logit_bias=NO_EOS)
            engine.submit(late)
            got_first, got_late = first_sink.result, late_sink.result
    finally:
        engine.close()
    assert got_first.text == run_alone(mix, "A", max_tokens=30, logit_bias=NO_EOS).text
    assert got_late.text == run_alone(mix, "MKTAYIAKQRQISFVKSHFSRQ", max_tokens=20, logit_bias=NO_EOS).text


# ---------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server(mix):
    srv = Server(create_app(mix, model_id="tiny", max_tokens_limit=100, max_batch=2, max_queue=1, max_body=4096))
    yield srv
    srv.stop()


def _state(server):
    return server.server.config.app.state.server


def _ask(server, **body):
    body = {"model": "tiny", "prompt": "ACDK", "max_tokens": 8, "temperature": 0, **body}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


def test_a_seeded_request_is_the_same_alone_and_under_load(server):
    body = dict(prompt="MKTAYIAKQ", max_tokens=16, temperature=1.1, top_p=0.95, seed=1234)
    alone = _ask(server, **body).json()["choices"][0]["text"]
    with slow(_state(server).model, 0.002):
        results = {}
        threads = [
            threading.Thread(
                target=lambda k=k: results.__setitem__(
                    k,
                    _ask(server, **body)
                    if k == 0
                    else _ask(server, prompt="GRAVY", max_tokens=40, temperature=0.8, seed=k),
                )
            )
            for k in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results[0].json()["choices"][0]["text"] == alone
    assert results[1].status_code == 200


def _stream_then_hang_up(server, tokens=90):
    body = {
        "model": "tiny",
        "prompt": "GRAVY",
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": {str(EOS): -100},
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text": "' in line:
                break  # one piece read: hang up


def _cancelled(state):
    return state.metrics.finished_total.labels("cancelled")._value.get()


def test_a_streaming_client_that_hangs_up_frees_its_slot(server):
    state = _state(server)
    before = _cancelled(state)
    with slow(state.model, 0.05):  # 90 tokens take 4.5 s: at 0.01 s a step a busy CI machine finished them first
        _stream_then_hang_up(server)
        # the engine frees the row, then counts the reason: wait for the count, not for the row alone
        wait_for(lambda: _cancelled(state) == before + 1)
        wait_for(lambda: state.engine.active == 0)


def test_a_non_streaming_client_that_hangs_up_frees_its_slot(server):
    state = _state(server)
    before = _cancelled(state)
    body = b'{"model": "tiny", "prompt": "GRAVY", "max_tokens": 90, "temperature": 0, "logit_bias": {"2": -100}}'
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with slow(state.model, 0.05):  # 90 tokens take 4.5 s: the hang-up is seen long before, even on a busy machine
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head.encode() + body)
            wait_for(lambda: state.engine.active == 1)
        wait_for(lambda: _cancelled(state) == before + 1)  # counted after the row is freed (the test above)
        wait_for(lambda: state.engine.active == 0)


def test_a_full_queue_answers_503_with_retry_after(server):
    state = _state(server)
    with slow(state.model, 0.02):
        long = dict(max_tokens=60, logit_bias={str(EOS): -100})
        threads = [threading.Thread(target=_ask, args=(server,), kwargs=long) for _ in range(3)]
        for t, (active, queued) in zip(threads, [(1, 0), (2, 0), (2, 1)]):  # two slots, then the queue (max 1)
            t.start()
            wait_for(lambda want=(active, queued): (state.engine.active, state.engine.queued) == want)
        r = _ask(server)
        for t in threads:
            t.join()
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    assert _ask(server).status_code == 200


def test_a_body_over_the_limit_is_refused_before_parsing(server):
    big = {"model": "tiny", "prompt": "x" * 10_000}
    r = httpx.post(server.url + "/v1/completions", json=big, timeout=60)
    assert r.status_code == 413 and "at most 4096 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length (chunked): counted as it arrives
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=60)
    assert r.status_code == 413
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head.encode())  # the header alone is enough: nothing of the body is read
        assert s.recv(4096).decode().startswith("HTTP/1.1 413")
    assert _ask(server).status_code == 200  # a body under the limit goes through
    rejected = _state(server).metrics.rejected.labels("413")._value.get()
    assert rejected >= 2


def test_request_timeout_and_body_timeout(mix):
    srv = Server(create_app(mix, model_id="tiny", max_tokens_limit=100, request_timeout=0.3, body_timeout=0.3))
    try:
        with slow(mix, 0.02):
            r = _ask(srv, max_tokens=90, logit_bias={str(EOS): -100})
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(head.encode() + b'{"model"')  # then nothing: a stalled body
            reply = s.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408")
    finally:
        srv.stop()


def test_metrics_in_prometheus_format(server):
    assert _ask(server, max_tokens=6, logit_bias={str(EOS): -100}).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "loramix_queue_depth",
        "loramix_active_slots",
        "loramix_tokens_per_second",
        "loramix_time_to_first_token_seconds",
        "loramix_inter_token_latency_seconds",
    ):
        assert name in families, name
    assert families["loramix_slots"].samples[0].value == 2
    ttft = {s.name: s.value for s in families["loramix_time_to_first_token_seconds"].samples}
    assert ttft["loramix_time_to_first_token_seconds_count"] >= 1
    itl = {s.name: s.value for s in families["loramix_inter_token_latency_seconds"].samples}
    assert itl["loramix_inter_token_latency_seconds_count"] >= 5
    experts = {s.labels["expert"]: s.value for s in families["loramix_expert_mean_scaling"].samples}
    assert sorted(experts) == sorted(_state(server).model.expert_names)
    assert all(0 < v < 1 for v in experts.values())


def test_a_slow_request_head_is_closed(mix):
    """slowloris: a connection whose request head does not complete in header_timeout seconds is closed."""
    import uvicorn

    from loramix.serve.server import header_timeout_protocol

    port = _free_port()
    config = uvicorn.Config(
        create_app(mix, model_id="tiny"),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=header_timeout_protocol(0.3),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            assert s.recv(4096) == b""  # closed by the server (a timeout of the socket would raise)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # a complete head is served
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_compiled_step_serves_the_same_slots(mix):
    """--compile: the slots' decode step traced by torch.compile (the cheap aot_eager backend here) gives every row,
    granular and prompt mode mixed in one batch, the text the eager engine gives."""
    settings = [("ACDK", {"max_tokens": 10}), ("KKLL", {"max_tokens": 6, "mode": "prompt"}), ("W", {"max_tokens": 8})]
    texts = {}
    for compile in (False, "aot_eager"):
        engine = Engine(mix, max_batch=4, compile=compile)
        try:
            made = [make_job(mix, prompt, **kwargs) for prompt, kwargs in settings]
            engine.submit_group([job for job, _ in made])
            texts[compile] = [(sink.result.text, sink.result.completion_tokens) for _, sink in made]
        finally:
            engine.close()
    assert texts["aot_eager"] == texts[False]
    assert texts[False][0][0] == _greedy(mix, mix.tokenizer("ACDK").input_ids, 10)[0]


def test_the_queue_bound_counts_only_jobs_waiting_beyond_the_free_slots(mix):
    """Requests that arrive together while slots are free all get in (the free slots take them at the next step);
    only jobs beyond the free slots and max_queue are refused. The engine's lock is held so that the worker admits
    nothing in between."""
    from loramix.serve.engine import QueueFull

    engine = Engine(mix, max_batch=2, max_queue=1)
    try:
        made = [make_job(mix, "ACDK", max_tokens=2) for _ in range(4)]
        with engine._cond:  # reentrant: submit takes it again in this thread
            for job, _ in made[:3]:
                engine.submit(job)  # 2 for the free slots, 1 waiting
            with pytest.raises(QueueFull):
                engine.submit(made[3][0])
        assert all(isinstance(sink.result, Done) for _, sink in made[:3])
    finally:
        engine.close()


# ---------------------------------------------------------------------- one request never harms another (issue 29)


@contextmanager
def nan_logits_after(mix, token):
    """The mixed model gives NaN logits to every row whose last input token is `token` (a failure of that row's
    own, e.g. a corrupt expert it routes to)."""

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is not None:
            output.logits[ids[:, -1] == token] = float("nan")
        return output

    handle = mix.model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def wide(mix):
    srv = Server(create_app(mix, model_id="tiny", max_tokens_limit=100, max_batch=4))
    yield srv
    srv.stop()


def _together(server, bodies):
    results = {}
    threads = [threading.Thread(target=lambda i=i, b=b: results.__setitem__(i, _ask(server, **b)))
               for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(bodies))]


def test_a_failing_request_fails_alone_and_leaves_its_row_clean(wide, mix):
    long = dict(prompt="ACDK", max_tokens=40, logit_bias=NO_EOS)
    bad = dict(prompt="GRAVY<LLLLLLLL>=", max_tokens=20, loramix={"mode": "prompt"})
    equals = mix.tokenizer.convert_tokens_to_ids("=")
    with slow(mix, 0.002), nan_logits_after(mix, equals):
        results = _together(wide, [long, long, bad, long])
    assert results[2].status_code == 500 and "non-finite" in results[2].json()["error"]["message"]
    want = mix.tokenizer.decode(
        mix.generate(torch.tensor([mix.tokenizer("ACDK").input_ids]), max_new_tokens=40,
                     sampling=SamplingSettings(logit_bias=NO_EOS)).new_tokens[0].tolist(),
        skip_special_tokens=True,
    )
    assert [r.json()["choices"][0]["text"] for r in (results[0], results[1], results[3])] == [want] * 3
    # every row, the failed one's included, then serves a greedy granular request as the library does
    prompt = "GRAVY<MKTAYIAK>="
    again = _together(wide, [dict(prompt=prompt, max_tokens=12)] * 4)
    assert {r.json()["choices"][0]["text"] for r in again} == {_greedy(mix, mix.tokenizer(prompt).input_ids, 12)[0]}
    failed = _state(wide).metrics.finished_total.labels("error")._value.get()
    assert failed == 1


def test_a_tiny_temperature_is_greedy_and_an_uncomputable_penalty_is_refused(wide, mix):
    prompt = "GRAVY<LLLLLLLL>="
    tiny = _ask(wide, prompt=prompt, max_tokens=20, temperature=1e-300, loramix={"mode": "prompt"})
    greedy = _ask(wide, prompt=prompt, max_tokens=20, temperature=0, loramix={"mode": "prompt"})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    refused = _ask(wide, prompt=prompt, temperature=1, loramix={"repetition_penalty": 1e-300})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "loramix.repetition_penalty" and "0.01" in error["message"]


def test_a_queued_job_whose_client_hangs_up_gets_a_final_message(mix):
    engine = Engine(mix, max_batch=1)
    try:
        with slow(mix, 0.002):
            long, long_sink = make_job(mix, "GRAVY", max_tokens=60, stream=True, logit_bias=NO_EOS)
            engine.submit(long)
            assert long_sink.started.wait(30)
            queued, queued_sink = make_job(mix, "ACDK", max_tokens=8)
            engine.submit(queued)
            assert engine.queued == 1
            queued.cancelled = True  # the client hung up while the job waited for a row
            assert queued_sink.result == Failed(0, "the client closed the request", 499)
            assert long_sink.result.completion_tokens == 60
    finally:
        engine.close()


def test_a_non_streaming_client_that_hangs_up_while_queued_leaves_no_handler(wide):
    """The request's handler ends (uvicorn has no task left once the running requests finish): before, it waited
    on its queue forever and SIGTERM never completed."""
    state = _state(wide)
    body = b'{"model": "tiny", "prompt": "ACDK", "max_tokens": 8, "temperature": 0}'
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    longs = [dict(prompt="GRAVY", max_tokens=60, logit_bias=NO_EOS)] * 4
    with slow(state.model, 0.01):
        runner = threading.Thread(target=_together, args=(wide, longs))
        runner.start()
        wait_for(lambda: state.engine.active == 4)
        with socket.create_connection(("127.0.0.1", wide.port)) as s:
            s.sendall(head.encode() + body)
            wait_for(lambda: state.engine.queued == 1)
        runner.join()
    wait_for(lambda: not wide.server.server_state.tasks)
    assert state.engine.queued == 0 and state.engine.active == 0
