"""Prompt sets for training and evaluation, and deterministic prompt sampling.

Prompts come from a ``.txt`` file (one per line), a ``.jsonl`` file (one JSON object with a
``prompt`` field per line) or one of the bundled sets (``builtin:train`` / ``builtin:eval``).
Malformed input raises :class:`PromptFileError` with a one-line message naming the file and line,
so a bad prompt file fails fast at start-up instead of mid-run on some remote worker.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from tpdm_rl.core.console import warn
from tpdm_rl.core.toyworld import PromptError, parse_prompt  # numpy only: `tpdm-rl config` stays fast

__all__ = ["BUILTIN_SETS", "PromptFileError", "PromptSampler", "check_toy_prompts", "load_prompts"]

#: Names accepted after ``builtin:`` and the bundled file each one maps to (in ``tpdm_rl.data``).
BUILTIN_SETS: dict[str, str] = {"train": "prompts_train.txt", "eval": "prompts_eval.txt",
                                "toy-train": "toy_train.txt", "toy-heldout": "toy_heldout.txt",
                                "toy-places-train": "toy_places_train.txt",
                                "toy-places-heldout": "toy_places_heldout.txt"}

_BUILTIN_PREFIX = "builtin:"
_SUFFIXES = (".txt", ".jsonl")


class PromptFileError(ValueError):
    """A prompt source is missing or malformed.

    The message is always a single line (file path, 1-based line number where relevant, and what
    was expected) so it stays readable in logs that are aggregated line by line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def _where(path: str, lineno: int | None = None) -> str:
    return f"{path}:{lineno}" if lineno is not None else path


def _decode(data: bytes, path: str) -> str:
    """Decode UTF-8 (a leading BOM is tolerated), reporting the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise PromptFileError(
            f"{_where(path, lineno)}: file is not valid UTF-8 (byte {e.start}: {e.reason}); "
            "expected UTF-8 encoded text"
        ) from None


def _lines(text: str) -> list[str]:
    """The file's real lines, split at newlines only (as editors and ``_decode`` count them; ``str.splitlines``
    also splits at form feeds, U+2028 and others, which shifts every later line number)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parse_txt(text: str) -> list[tuple[int, str]]:
    prompts = []
    for lineno, line in enumerate(_lines(text), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append((lineno, line))
    return prompts


def _parse_jsonl(text: str, path: str) -> list[tuple[int, str]]:
    prompts = []
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(
                f"{_where(path, lineno)}: invalid JSON ({e.msg} at column {e.colno}); "
                'expected a JSON object like {"prompt": "..."}'
            ) from None
        if not isinstance(record, dict):
            raise PromptFileError(
                f"{_where(path, lineno)}: expected a JSON object with a 'prompt' field, "
                f"got {type(record).__name__}"
            )
        if "prompt" not in record:
            raise PromptFileError(
                f"{_where(path, lineno)}: missing field 'prompt'; expected a non-empty string"
            )
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise PromptFileError(
                f"{_where(path, lineno)}: field 'prompt' must be a non-empty string, got {type(prompt).__name__}"
            )
        prompt = prompt.strip()
        if not prompt:
            raise PromptFileError(
                f"{_where(path, lineno)}: field 'prompt' is empty; expected a non-empty string"
            )
        prompts.append((lineno, prompt))
    return prompts


def _read_builtin(name: str, source: str) -> tuple[bytes, str]:
    if name not in BUILTIN_SETS:
        expected = ", ".join(_BUILTIN_PREFIX + k for k in BUILTIN_SETS)
        raise PromptFileError(f"{source}: unknown built-in prompt set {name!r}; expected one of {expected}")
    resource = resources.files("tpdm_rl.data").joinpath(BUILTIN_SETS[name])
    try:
        return resource.read_bytes(), f"{source} ({resource})"
    except OSError as e:
        raise PromptFileError(f"{source}: bundled prompt file {resource} cannot be read ({e})") from None


def load_prompts(source: str | os.PathLike[str], toy: bool = False) -> list[str]:
    """Load prompts from a ``.txt``/``.jsonl`` file or a bundled set (``builtin:train``, ``builtin:eval``).

    ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped and
    surrounding whitespace is stripped. ``.jsonl``: every non-blank line must be a JSON object with a
    non-empty string field ``prompt`` (other fields are ignored). Duplicates are kept: repeating a
    prompt is a legitimate way to up-weight it. ``toy``: every prompt must parse in the toy world's
    grammar (``tpdm_rl.core.toyworld.parse_prompt``; the ``shapes`` reward scores nothing else).

    Raises:
        PromptFileError: the file is missing/unreadable, has an unsupported extension, is not
            UTF-8, contains a malformed line, yields no prompts at all, or (``toy``) holds a prompt
            outside the toy grammar; the message names the file's real line (comments and blank
            lines counted).
    """
    raw = os.fspath(source)
    if isinstance(raw, bytes):  # os.PathLike[bytes]; normalise so messages stay text
        raw = os.fsdecode(raw)
    if raw.startswith(_BUILTIN_PREFIX):
        data, where = _read_builtin(raw[len(_BUILTIN_PREFIX) :], raw)
        suffix = ".txt"
    else:
        path = Path(raw)
        where = str(path)
        suffix = path.suffix.lower()
        if suffix not in _SUFFIXES:
            shown = repr(path.suffix) if path.suffix else "no extension"
            raise PromptFileError(
                f"{where}: unsupported prompt file extension {shown}; expected one of "
                f"{', '.join(_SUFFIXES)} or {', '.join(_BUILTIN_PREFIX + k for k in BUILTIN_SETS)}"
            )
        if not path.exists():
            raise PromptFileError(f"{where}: prompt file not found")
        if not path.is_file():
            raise PromptFileError(f"{where}: not a regular file; expected a {suffix} prompt file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PromptFileError(f"{where}: cannot read prompt file ({e.strerror or e})") from None

    text = _decode(data, where)
    numbered = _parse_jsonl(text, where) if suffix == ".jsonl" else _parse_txt(text)
    if toy:
        check_toy_prompts(numbered, where)
    prompts = [p for _, p in numbered]
    if not prompts:
        raise PromptFileError(f"{where}: no prompts found; expected at least one non-blank, non-comment line")
    distinct = len(set(prompts))
    if len(prompts) > 1 and distinct == 1:
        warn(f"{where}: all {len(prompts)} prompts are the same prompt; every group will train on it")
    return prompts


def check_toy_prompts(numbered: Sequence[tuple[int, str]], where: str) -> None:
    """Parse every ``(line number, prompt)`` with the toy grammar; the first one outside it is a
    :class:`PromptFileError` naming the file, its line and the parser's reason."""
    for lineno, prompt in numbered:
        try:
            parse_prompt(prompt)
        except PromptError as exc:
            reason = str(exc).split(" is not in the toy grammar: ", 1)[-1]
            raise PromptFileError(
                f"{_where(where, lineno)}: prompt {prompt!r} is not in the toy grammar: {reason}; the "
                "shapes reward scores only toy-world prompts (docs/toy-world.md)"
            ) from None


def _epoch_seed(seed: int, epoch: int) -> int:
    """Stable 63-bit seed for one epoch's permutation.

    Uses SHA-256 rather than ``hash()`` so the value is identical across processes, Python
    versions and machines (Ray workers must agree with the driver and with a resumed run).
    """
    digest = hashlib.sha256(f"tpdm_rl.PromptSampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class PromptSampler:
    """Deterministic, stateless epoch-based sampling of prompt indices.

    Conceptually there is an infinite stream formed by concatenating one random permutation of
    ``range(len(prompts))`` per epoch (epoch ``e`` is shuffled by a ``torch.Generator`` seeded from a
    hash of ``(seed, e)``). Iteration ``i`` with batch size ``n`` takes stream positions
    ``[i * n, (i + 1) * n)``. Consequences:

    * ``sample(i, n)`` is a pure function of ``(seed, i, n, len(prompts))``; calls may come in any
      order, from any process.
    * Resuming at iteration ``i`` (e.g. after a checkpoint restore) yields exactly the prompts the
      uninterrupted run would have seen; no sampler state needs to be checkpointed.
    * Within one epoch every prompt is drawn exactly once (no replacement). A batch that straddles
      an epoch boundary, or is larger than the prompt set, can contain repeats.
    * Keep ``n`` fixed for a run: changing it changes which stream positions an iteration maps to.
    """

    def __init__(self, prompts: Sequence[str], seed: int) -> None:
        if len(prompts) == 0:
            raise ValueError("PromptSampler needs at least one prompt")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.prompts: list[str] = list(prompts)
        self.seed = seed
        # Memo of the last permutation only: consecutive iterations usually share an epoch. It is
        # a pure cache and never changes results.
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def _permutation(self, epoch: int) -> list[int]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        import torch  # here, not at module level: `tpdm-rl config` validates prompts without loading torch

        gen = torch.Generator(device="cpu")
        gen.manual_seed(_epoch_seed(self.seed, epoch))
        perm = torch.randperm(len(self.prompts), generator=gen).tolist()
        self._cached = (epoch, perm)
        return perm

    def sample(self, iteration: int, n: int) -> list[int]:
        """Return the ``n`` prompt indices for ``iteration`` (stream positions ``[iteration*n, (iteration+1)*n)``)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        size = len(self.prompts)
        start, stop = iteration * n, (iteration + 1) * n
        out: list[int] = []
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, size)
            take = min(size - offset, stop - pos)
            out.extend(self._permutation(epoch)[offset : offset + take])
            pos += take
        return out

    def sample_prompts(self, iteration: int, n: int) -> list[str]:
        """Convenience: the prompt strings for :meth:`sample`."""
        return [self.prompts[i] for i in self.sample(iteration, n)]
