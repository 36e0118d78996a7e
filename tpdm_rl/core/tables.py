"""Hand-made sigma tables: validation, the two parametric families, and named families for ``eval --tables``.

A table is a strictly decreasing list of sigmas that starts above 0 and ends at exactly 0; its NFE is its
length - 1 (the last step goes to 0 with the velocity at hand, as for every method).

Two parametric families cover the shapes that beat diffusers' ``fixed:N`` on the toy world:

``shift_table(shift, n)``
    n equal steps in t from 1 to 0 mapped through the flow-matching shift s t / (1 + (s - 1) t). Unlike
    diffusers' table (which ends at t = 1/1000 and so spends its last NFE at sigma ~0.009), the last step
    jumps from shift(1/n) straight to 0. ``shift_table(3, 4)`` = 1, .9, .75, .5, 0.
``two_phase_table(a, b, knee)``
    a equal steps from 1 down to ``knee``, then b equal steps from the knee to 0 (NFE a + b).
    ``two_phase_table(2, 3, 0.9)`` = 1, .95, .9, .6, .3, 0.

A *family* is one table per NFE. ``builtin:toy`` (``builtin:toy-places``) holds the tables chosen on
training-split prompts of the toy world (the places world; ``benchmarks/toy_tables.py`` and
``benchmarks/toy_headroom.py`` write them; never chosen on the held-out set); ``shift:S`` is
``shift_table(S, n)`` for every n; a ``.json`` file maps NFE to a table.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path

TOY_TABLES_FILE = "toy_tables.json"
#: the shipped families: the first toy world's and the places world's (each chosen on its training split)
BUILTIN_FAMILIES = {"builtin:toy": TOY_TABLES_FILE, "builtin:toy-places": "toy_places_tables.json"}
FAMILY_FORMS = "builtin:toy, builtin:toy-places, shift:S (S > 0) or a .json file {\"N\": [sigmas ... 0]}"


class TableError(ValueError):
    """A sigma table or table family is malformed (one-line message naming it)."""


def check_stop_steps(stop_steps: int, table: list[float] | tuple[float, ...]) -> None:
    """``policy.init_stop_steps`` is 0 (the table's own step count) or a step count the table reaches: 1 .. len - 1."""
    if not 0 <= stop_steps <= len(table) - 1:
        raise TableError(f"policy.init_stop_steps must be 0 (the table's own {len(table) - 1} steps) or "
                         f"1..{len(table) - 1} for init_table {list(table)}, got {stop_steps}")


def check_table(values: list[float] | tuple[float, ...], what: str = "sigma table") -> tuple[float, ...]:
    """The table as floats, or :class:`TableError` saying what is wrong: decreasing, in [0, 1], ending at 0."""
    text = ",".join(f"{v:g}" if isinstance(v, float | int) else str(v) for v in values)
    if len(values) == 0:
        raise TableError(f"{what} is empty; expected decreasing sigmas in [0, 1] ending at 0, e.g. 1,0.9,0.5,0")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TableError(f"{what} {text!r} holds a value that is not a number") from None
    if any(not math.isfinite(v) or v < 0 or v > 1 for v in out):
        raise TableError(f"{what} {text!r} has a value outside [0, 1]")
    if len(out) < 2:
        raise TableError(f"{what} {text!r} needs at least two values (a start and the final 0)")
    if out[-1] != 0.0:
        raise TableError(f"{what} {text!r} must end at 0")
    if any(b >= a for a, b in zip(out, out[1:])):
        raise TableError(f"{what} {text!r} is not strictly decreasing")
    return out


def shift_table(shift: float, n: int) -> tuple[float, ...]:
    """n equal steps in t through the flow-matching shift, the last one straight to 0 (see module docstring)."""
    if n < 1 or shift <= 0:
        raise TableError(f"shift table needs n >= 1 and shift > 0, got n={n}, shift={shift}")
    ts = [1.0 - k / n for k in range(n)]
    return tuple(shift * t / (1.0 + (shift - 1.0) * t) for t in ts) + (0.0,)


def two_phase_table(a: int, b: int, knee: float) -> tuple[float, ...]:
    """``a`` equal steps from 1 to ``knee``, then ``b`` equal steps from the knee to 0."""
    if a < 1 or b < 1 or not 0 < knee < 1:
        raise TableError(f"two-phase table needs a, b >= 1 and 0 < knee < 1, got a={a}, b={b}, knee={knee}")
    first = [1.0 - (1.0 - knee) * k / a for k in range(a)]
    second = [knee * (1.0 - k / b) for k in range(b)]
    return tuple(first + second) + (0.0,)


def load_family(name: str | os.PathLike) -> dict[int, tuple[float, ...]]:
    """A named family of tables, one per NFE (see module docstring); :class:`TableError` when unknown."""
    text = str(name).strip()
    if text in BUILTIN_FAMILIES:
        return _family_file(Path(str(resources.files("tpdm_rl") / "data" / BUILTIN_FAMILIES[text])))
    if text.startswith("shift:"):
        try:
            s = float(text.partition(":")[2])
        except ValueError:
            s = math.nan
        if not math.isfinite(s) or s <= 0:
            raise TableError(f"table family {text!r}: the shift must be a number > 0; expected {FAMILY_FORMS}")
        return {n: shift_table(s, n) for n in range(1, 29)}
    if text.endswith(".json"):
        return _family_file(Path(text))
    raise TableError(f"unknown table family {text!r}; expected {FAMILY_FORMS}")


def _family_file(path: Path) -> dict[int, tuple[float, ...]]:
    if not path.is_file():
        raise TableError(f"table family file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
        tables = data["tables"] if isinstance(data, dict) and "tables" in data else data
        out = {int(n): check_table(v, f"table for NFE {n} in {path.name}") for n, v in tables.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        if isinstance(exc, TableError):
            raise
        raise TableError(f"table family file {str(path)!r} is not a JSON object {{\"N\": [sigmas ... 0]}}") from None
    for n, t in out.items():
        if len(t) - 1 != n:
            raise TableError(f"table family file {str(path)!r}: the table under {n} has {len(t) - 1} steps")
    return dict(sorted(out.items()))
