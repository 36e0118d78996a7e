"""Tests for tpdm_rl.core.prompts: bundled prompt sets, file loading/validation, and PromptSampler."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from tpdm_rl.core.prompts import PromptFileError, PromptSampler, load_prompts

# ---------------------------------------------------------------------------------------------
# bundled sets


@pytest.fixture(scope="module")
def train() -> list[str]:
    return load_prompts("builtin:train")


@pytest.fixture(scope="module")
def eval_set() -> list[str]:
    return load_prompts("builtin:eval")


def test_builtin_sizes(train: list[str], eval_set: list[str]) -> None:
    assert len(train) >= 100
    assert len(eval_set) >= 40


def test_builtin_no_duplicates_or_overlap(train: list[str], eval_set: list[str]) -> None:
    def norm(s: str) -> str:
        return " ".join(s.lower().split())

    assert len({norm(p) for p in train}) == len(train)
    assert len({norm(p) for p in eval_set}) == len(eval_set)
    assert not {norm(p) for p in train} & {norm(p) for p in eval_set}


@pytest.mark.parametrize("name", ["prompts_train.txt", "prompts_eval.txt"])
def test_builtin_files_are_clean(name: str) -> None:
    """No blank lines; '#' only in the leading header; no stray whitespace."""
    text = resources.files("tpdm_rl.data").joinpath(name).read_text(encoding="utf-8")
    lines = text.splitlines()
    body_started = False
    for i, line in enumerate(lines, start=1):
        assert line.strip(), f"{name}:{i} is blank"
        assert line == line.strip(), f"{name}:{i} has surrounding whitespace"
        if line.startswith("#"):
            assert not body_started, f"{name}:{i} comment after the header"
        else:
            body_started = True


def test_builtin_prompts_are_diverse(train: list[str]) -> None:
    # Text rendering (quoted text), counting and long compositional prompts are all represented.
    assert sum('"' in p for p in train) >= 5
    assert sum(p.split()[0] in {"two", "three", "four", "five", "six", "seven"} for p in train) >= 5
    assert sum(len(p.split()) >= 15 for p in train) >= 10


def test_unknown_builtin() -> None:
    with pytest.raises(PromptFileError, match=r"builtin:test.*builtin:train, builtin:eval"):
        load_prompts("builtin:test")


# ---------------------------------------------------------------------------------------------
# loading


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def _assert_one_line(err: pytest.ExceptionInfo[PromptFileError], *fragments: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "\r" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_txt_loading(tmp_path: Path) -> None:
    p = _write(
        tmp_path, "p.txt", "# header\n\n  a red apple  \n\t\n# mid comment\na blue car\r\na red apple\n"
    )
    assert load_prompts(p) == ["a red apple", "a blue car", "a red apple"]
    assert load_prompts(str(p)) == load_prompts(p)


def test_txt_with_bom(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.txt", "\ufeffa cat\n".encode())
    assert load_prompts(p) == ["a cat"]


def test_uppercase_extension(tmp_path: Path) -> None:
    p = _write(tmp_path, "P.TXT", "a cat\n")
    assert load_prompts(p) == ["a cat"]


def test_jsonl_loading(tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt": "a cat", "tag": "animal"}),
        "",
        json.dumps({"prompt": "  a dog  "}),
        "   ",
        json.dumps({"prompt": 'a sign that says "hi"'}),
    ]
    p = _write(tmp_path, "p.jsonl", "\n".join(lines) + "\n")
    assert load_prompts(p) == ["a cat", "a dog", 'a sign that says "hi"']


@pytest.mark.parametrize(
    ("bad_line", "expect"),
    [
        ("{not json", "invalid JSON"),
        ('{"prompt": "unterminated', "invalid JSON"),
        ('["a cat"]', "got list"),
        ('"a cat"', "got str"),
        ("42", "got int"),
        ("null", "got NoneType"),
        ('{"text": "a cat"}', "missing field 'prompt'"),
        ('{"prompt": ""}', "'prompt' is empty"),
        ('{"prompt": "   "}', "'prompt' is empty"),
        ('{"prompt": 3}', "got int"),
        ('{"prompt": null}', "got NoneType"),
        ('{"prompt": ["a", "b"]}', "got list"),
    ],
)
def test_jsonl_malformed_names_line(tmp_path: Path, bad_line: str, expect: str) -> None:
    good = json.dumps({"prompt": "fine"})
    # Line 4 is bad (line 2 is blank and must still count towards the numbering).
    p = _write(tmp_path, "bad.jsonl", f"{good}\n\n{good}\n{bad_line}\n{good}\n")
    with pytest.raises(PromptFileError) as err:
        load_prompts(p)
    _assert_one_line(err, f"{p}:4", expect)


def test_jsonl_error_is_value_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad.jsonl", "{oops\n")
    with pytest.raises(ValueError, match=r":1: invalid JSON"):
        load_prompts(p)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.txt"
    with pytest.raises(PromptFileError) as err:
        load_prompts(p)
    _assert_one_line(err, str(p), "not found")


def test_directory_is_rejected(tmp_path: Path) -> None:
    d = tmp_path / "dir.txt"
    d.mkdir()
    with pytest.raises(PromptFileError) as err:
        load_prompts(d)
    _assert_one_line(err, str(d), "not a regular file")


@pytest.mark.parametrize("name", ["prompts.csv", "prompts.json", "prompts"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    p = _write(tmp_path, name, "a cat\n")
    with pytest.raises(PromptFileError) as err:
        load_prompts(p)
    msg = _assert_one_line(err, str(p), ".txt", ".jsonl")
    assert (Path(name).suffix or "no extension") in msg


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.txt", ""), ("e.txt", "# only a comment\n\n   \n"), ("e.jsonl", ""), ("e.jsonl", "\n  \n")],
)
def test_empty_files(tmp_path: Path, name: str, content: str) -> None:
    p = _write(tmp_path, name, content)
    with pytest.raises(PromptFileError) as err:
        load_prompts(p)
    _assert_one_line(err, str(p), "no prompts")


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl"])
def test_non_utf8(tmp_path: Path, name: str) -> None:
    good = b'{"prompt": "ok"}\n' if name.endswith("jsonl") else b"ok\n"
    p = _write(tmp_path, name, good + good + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(PromptFileError) as err:
        load_prompts(p)
    _assert_one_line(err, f"{p}:3", "UTF-8")


def test_error_message_stays_one_line_with_newline_in_path(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError) as err:
        load_prompts(tmp_path / "weird\nname.txt")
    _assert_one_line(err, "not found")


def test_error_pickles(tmp_path: Path) -> None:
    """Errors raised in Ray workers are pickled back to the driver."""
    with pytest.raises(PromptFileError) as err:
        load_prompts(tmp_path / "nope.txt")
    clone = pickle.loads(pickle.dumps(err.value))
    assert isinstance(clone, PromptFileError)
    assert str(clone) == str(err.value)


# ---------------------------------------------------------------------------------------------
# sampler


PROMPTS = [f"prompt {i}" for i in range(10)]


def test_sampler_deterministic() -> None:
    a, b = PromptSampler(PROMPTS, seed=123), PromptSampler(PROMPTS, seed=123)
    for it in range(12):
        assert a.sample(it, 4) == b.sample(it, 4)
    assert a.sample(3, 4) == a.sample(3, 4)


def test_sampler_seed_matters() -> None:
    a, b = PromptSampler(PROMPTS, seed=0), PromptSampler(PROMPTS, seed=1)
    assert [a.sample(i, 5) for i in range(4)] != [b.sample(i, 5) for i in range(4)]


def test_sampler_known_values_stable() -> None:
    """Pins the stream so an accidental change to the hashing/shuffling (which would silently break
    resuming old runs) is caught."""
    s = PromptSampler(PROMPTS, seed=0)
    assert s.sample(0, 10) == [4, 3, 8, 1, 5, 0, 7, 2, 9, 6]
    assert s.sample(1, 10) == [6, 0, 8, 1, 4, 3, 7, 2, 9, 5]
    # The same stream, whatever the batch size used to walk it.
    stream = [i for it in range(3) for i in s.sample(it, 10)]
    again = PromptSampler(PROMPTS, seed=0)
    assert stream == [i for it in range(30) for i in again.sample(it, 1)]


@pytest.mark.parametrize("n", [1, 3, 4, 10])
def test_sampler_no_replacement_within_epoch(n: int) -> None:
    s = PromptSampler(PROMPTS, seed=7)
    size = len(PROMPTS)
    epochs = 5
    stream = [i for it in range(epochs * size // n + 1) for i in s.sample(it, n)]
    for e in range(epochs):
        chunk = stream[e * size : (e + 1) * size]
        assert sorted(chunk) == list(range(size)), f"epoch {e}"


def test_sampler_epochs_differ() -> None:
    s = PromptSampler(PROMPTS, seed=7)
    perms = {tuple(s.sample(e, len(PROMPTS))) for e in range(6)}
    assert len(perms) > 1


def test_sampler_independent_of_call_order() -> None:
    n = 3
    forward = PromptSampler(PROMPTS, seed=5)
    expected = {it: forward.sample(it, n) for it in range(20)}
    shuffled = PromptSampler(PROMPTS, seed=5)
    for it in [17, 0, 9, 3, 19, 3, 12, 1, 18, 5, 2, 4, 6, 7, 8, 10, 11, 13, 14, 15, 16]:
        assert shuffled.sample(it, n) == expected[it]


def test_sampler_resume_matches_uninterrupted() -> None:
    n = 4
    full = PromptSampler(PROMPTS, seed=99)
    run = [full.sample(it, n) for it in range(15)]
    resumed = PromptSampler(list(PROMPTS), seed=99)  # fresh object, as after a restart
    assert [resumed.sample(it, n) for it in range(8, 15)] == run[8:]


def test_sampler_straddles_epoch_boundary() -> None:
    s = PromptSampler(PROMPTS, seed=3)
    batch = s.sample(1, 7)  # positions 7..13: 3 from epoch 0, 4 from epoch 1
    assert batch[:3] == s.sample(0, 10)[7:]
    assert batch[3:] == s.sample(1, 10)[:4]


def test_sampler_batch_larger_than_set() -> None:
    s = PromptSampler(PROMPTS, seed=11)
    batch = s.sample(0, 25)
    assert len(batch) == 25
    counts = Counter(batch)
    assert set(counts) == set(range(len(PROMPTS)))
    assert all(c in (2, 3) for c in counts.values())
    assert sorted(batch[:10]) == list(range(10)) and sorted(batch[10:20]) == list(range(10))


def test_sampler_single_prompt() -> None:
    s = PromptSampler(["only"], seed=0)
    assert s.sample(5, 3) == [0, 0, 0]
    assert s.sample_prompts(2, 2) == ["only", "only"]


def test_sampler_sample_prompts_matches_indices() -> None:
    s = PromptSampler(PROMPTS, seed=2)
    assert s.sample_prompts(4, 3) == [PROMPTS[i] for i in s.sample(4, 3)]
    assert len(s) == len(PROMPTS)


def test_sampler_with_builtin_set(train: list[str]) -> None:
    s = PromptSampler(train, seed=0)
    n = 16
    stream = [i for it in range(len(train) // n + 1) for i in s.sample(it, n)]
    assert sorted(stream[: len(train)]) == list(range(len(train)))


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        PromptSampler([], seed=0)
    with pytest.raises(TypeError):
        PromptSampler(PROMPTS, seed=1.5)  # type: ignore[arg-type]
    s = PromptSampler(PROMPTS, seed=0)
    with pytest.raises(ValueError):
        s.sample(-1, 4)
    with pytest.raises(ValueError):
        s.sample(0, 0)
