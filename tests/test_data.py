import json

import pytest

from loramix.data import IGNORE, DataError, collate, load_records, split_records, tokenize_record


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_three_formats_and_loss_masks(tokenizer):
    text = tokenize_record({"text": "ab"}, tokenizer, 64)
    assert text.input_ids == [1, 69, 70, 2] and text.labels == text.input_ids  # <s> a b </s>, loss everywhere
    pc = tokenize_record({"prompt": "Q:", "completion": "A", "domain": "qa"}, tokenizer, 64)
    assert pc.input_ids == [1, 53, 30, 37, 2]
    assert pc.labels == [IGNORE, IGNORE, IGNORE, 37, 2]  # loss on the completion and EOS only
    assert pc.domain == "qa"
    chat = tokenize_record(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, tokenizer, 64
    )
    decoded = tokenizer.decode(chat.input_ids, skip_special_tokens=True)
    assert decoded == "user: hi\nassistant: yo\n"  # the documented plain format (no chat template)
    trained = tokenizer.decode([t for t, lab in zip(chat.input_ids, chat.labels) if lab != IGNORE])
    assert trained == " yo\n"


def test_chat_template_masks_only_assistant_turns(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}; {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    ex = tokenize_record({"messages": messages}, tok, 200)
    assert tok.decode(ex.input_ids) == "<system>S; <user>u1; <assistant>a1; <user>u2; <assistant>a2; "
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert trained == "a1; a2; "  # the assistant header is not trained on, its content and end marker are


def test_bad_lines_name_file_line_and_reason(tmp_path):
    cases = [
        ('{"text": "ok"}\n{"text": ', r":2: invalid JSON"),
        ('{"prompt": "a"}', r":1: expected exactly one of \{'text'\}, \{'prompt', 'completion'\} or \{'messages'\}"),
        ('{"text": 3}', r":1: 'text' must be a string, got int"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r":1: 'messages' has no assistant turn"),
        ('{"messages": [{"role": "user"}]}', r":1: messages\[0\] must be an object with string 'role' and 'content'"),
        ('{"text": "x", "domain": 5}', r":1: 'domain' must be a string"),
        ("[1, 2]", r":1: expected a JSON object, got list"),
    ]
    for i, (content, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(content + "\n")
        with pytest.raises(DataError, match=str(path).replace(".", r"\.") + message):
            load_records(path)
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")


def test_datasets_formats(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion,domain\nQ,A,qa\nR,B,qa\n")
    records = load_records(csv)
    assert records[1] == {"prompt": "R", "completion": "B", "domain": "qa"}
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert [r["text"] for r in load_records(js)] == ["x", "y"]


def test_split_is_reproducible_and_disjoint():
    records = [{"text": str(i)} for i in range(50)]
    a_train, a_eval = split_records(records, 0.2, seed=3)
    _, b_eval = split_records(records, 0.2, seed=3)
    assert a_eval == b_eval and len(a_eval) == 10 and len(a_train) == 40
    assert {r["text"] for r in a_train}.isdisjoint({r["text"] for r in a_eval})
    assert split_records(records, 0.2, seed=4)[1] != a_eval


def test_truncation_and_collate(tokenizer):
    ex = tokenize_record({"prompt": "abc", "completion": "defgh"}, tokenizer, 6)
    assert len(ex.input_ids) == 6 and ex.labels[:4] == [IGNORE] * 4
    with pytest.raises(DataError, match="nothing to train on after truncation to max_length=3"):
        tokenize_record({"prompt": "abcdef", "completion": "x"}, tokenizer, 3)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "domain": 1},
            {"input_ids": [8], "labels": [8], "domain": -1},
        ],
        0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]  # right padding for training
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["domain"].tolist() == [1, -1]
