"""benchmarks/toy_headroom.py: the cross-validated per-class allocation on score matrices whose answer is known,
and the script end to end on the shipped toy backbone at a tiny size."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tpdm_rl.core.tables import check_table, load_family

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("toy_headroom", REPO / "benchmarks" / "toy_headroom.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


th = _load()
NFES = list(range(1, 9))


def _matrix(curves: dict[int, list[float]], per_class: int, noise: float = 0.0, seed: int = 0):
    """A score matrix with ``per_class`` images of each class following its curve (+ per-image noise)."""
    g = torch.Generator().manual_seed(seed)
    rows, classes = [], []
    for c, curve in curves.items():
        rows.append(torch.tensor(curve, dtype=torch.float64).expand(per_class, -1)
                    + noise * torch.randn(per_class, len(curve), generator=g, dtype=torch.float64))
        classes += [c] * per_class
    return torch.cat(rows), torch.tensor(classes)


def test_candidates_are_valid_distinct_tables_of_n_steps():
    assert th.candidates(1) == [(1.0, 0.0)]
    for n in NFES:
        tabs = th.candidates(n)
        assert len(set(tabs)) == len(tabs) and all(len(check_table(t)) - 1 == n for t in tabs)
    assert len(th.candidates(8)) == len(th.SHIFTS) + th.A_MAX * len(th.KNEES)


def test_folds_are_stratified_seeded_and_balanced():
    classes = torch.tensor([0] * 7 + [1] * 5 + [2] * 1 + [4] * 9)
    a, b = th.stratified_folds(classes, 0), th.stratified_folds(classes, 0)
    assert torch.equal(a, b) and not torch.equal(a, th.stratified_folds(classes, 1))
    assert abs(int(a.sum()) * 2 - classes.numel()) <= 1
    for c in (0, 1, 4):
        k = int(a[classes == c].sum())
        assert abs(2 * k - int((classes == c).sum())) <= 1


def test_a_class_missing_from_the_choosing_fold_takes_the_pooled_choice():
    S = torch.tensor([[0.1, 0.9], [0.1, 0.8], [0.5, 0.5]], dtype=torch.float64)
    classes = torch.tensor([0, 0, 1])
    rows = torch.tensor([0, 1])  # class 1 absent: pooled fold mean prefers NFE 2
    choice = th.choose_per_class(S, torch.tensor([1, 2]), classes, torch.tensor([0.0, 1.0]), rows)
    assert choice[0].tolist()[:2] == [1, 1]  # lambda 0: class 0 and (pooled) class 1 take NFE 2
    assert choice[1].tolist()[:2] == [0, 0]  # lambda 1: one step is worth more than +0.75


def test_per_class_need_gives_a_positive_cross_validated_gain():
    """Class 0 saturates at 1 NFE, class 4 needs 6: a per-class allocation beats one table at equal NFE."""
    curves = {0: [0.9] * 8, 4: [0.9 * min(n, 6) / 6 for n in NFES]}
    S, classes = _matrix(curves, 40, noise=0.03)
    g = th.cv_sweep(S, NFES, classes)
    assert g["passes"] and g["best"]["z"] >= 3 and g["best"]["gain"] > 0.1
    assert g["best"]["nfe_per_class"] == {"0": [1], "4": [6]}
    assert 2 <= g["best"]["mean_nfe"] <= 8 and g["folds"]["sizes"] == [40, 40]
    zero = g["cv"][0]  # lambda 0 on noisy curves: whatever each fold picks, no per-class pick is 1 for class 4
    assert zero["lambda"] == 0.0 and min(zero["nfe_per_class"]["4"]) >= 6
    assert g["oracle_not_a_test"]["best"]["gain"] >= g["best"]["gain"] - 0.02


@pytest.mark.parametrize("offsets", [0.0, 0.1])
def test_identical_classes_gain_nothing(offsets):
    """Every class on one curve (images differing only by a constant offset): per class = one table, gain 0."""
    curve = [0.3, 0.5, 0.6, 0.66, 0.7, 0.72, 0.73, 0.735]
    S, classes = _matrix({c: curve for c in range(5)}, 20)
    S = S + offsets * torch.rand(S.shape[0], 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = th.cv_sweep(S, NFES, classes)
    for r in g["cv"] + g["oracle_not_a_test"]["rows"]:
        assert abs(r["gain"]) < 1e-12 and r["mean_nfe"] == int(r["mean_nfe"])
        assert len({tuple(v) for v in r["nfe_per_class"].values()}) == 1
    assert not g["passes"]


def test_an_image_never_chooses_its_own_step_count():
    """Changing fold 0's scores changes nothing that fold 0's images get (their classes' choice is fold 1's)."""
    S, classes = _matrix({0: [0.9] * 8, 2: [0.1 * n for n in NFES], 4: [0.9 * min(n, 6) / 6 for n in NFES]}, 12,
                         noise=0.05)
    lam = torch.tensor(th.LAMBDAS, dtype=torch.float64)
    fold = th.stratified_folds(classes, 0)
    choice, _ = th.cv_choice(S, torch.tensor(NFES), classes, lam, fold)
    S2 = S.clone()
    S2[fold == 0] = torch.rand(int((fold == 0).sum()), len(NFES), dtype=torch.float64)
    choice2, _ = th.cv_choice(S2, torch.tensor(NFES), classes, lam, fold)
    assert torch.equal(choice[:, fold == 0], choice2[:, fold == 0])
    assert not torch.equal(choice[:, fold == 1], choice2[:, fold == 1])


def _reference_cv(S, classes, nfes, lam, fold):
    """Loops, no tensor tricks: each image gets the argmax (fewest NFE on ties) of its class on the other fold."""
    scores, used = [], []
    for i in range(len(S)):
        other = [j for j in range(len(S)) if fold[j] != fold[i]]
        same = [j for j in other if classes[j] == classes[i]] or other
        vals = [sum(S[j][k] for j in same) / len(same) - lam * n for k, n in enumerate(nfes)]
        k = next(k for k, v in enumerate(vals) if v >= max(vals) - 1e-9)
        scores.append(S[i][k])
        used.append(nfes[k])
    return sum(scores) / len(scores), sum(used) / len(used)


def test_end_to_end_on_the_shipped_toy_backbone(tmp_path):
    """Tiny run (6 training prompts, 10 held-out, NFE 1..3), then the same held-out scores from the written
    family; the JSON's CV rows agree with a loop implementation on its own score matrix (~12 s)."""
    out, fam = tmp_path / "h.json", tmp_path / "fam.json"
    args = ["--threads", "1", "--train-count", "6", "--heldout-count", "10", "--nfe", "1,2,3", "--batch-size", "16"]
    assert th.main([*args, "--out", str(out), "--write-family", str(fam)]) == 0
    d = json.loads(out.read_text())
    for key in ("command", "threads", "machine", "backbone", "prompts", "tables", "curves", "score_matrix",
                "classes", "gate", "seconds"):
        assert key in d, key
    assert d["threads"] == 1 and "--nfe 1,2,3" in d["command"] and d["prompts"]["count"] == 10
    assert sorted(load_family(fam)) == [1, 2, 3] and d["tables"]["tables"]["1"] == [1.0, 0.0]
    assert sum(d["prompts"]["per_class"].values()) == 10 and d["curves"]["all"]["n"] == 10
    assert all(c["n"] == d["prompts"]["per_class"][k] for k, c in d["curves"].items() if k != "all")
    g = d["gate"]
    assert {"cv", "best", "passes", "rule", "oracle_not_a_test", "folds"} <= set(g)
    assert len(g["cv"]) == len(th.LAMBDAS) and isinstance(g["passes"], bool)

    S, classes = d["score_matrix"], d["classes"]
    fold = th.stratified_folds(torch.tensor(classes), g["folds"]["seed"]).tolist()
    for row in g["cv"][::7]:
        score, m = _reference_cv(S, classes, [1, 2, 3], row["lambda"], fold)
        assert row["score"] == pytest.approx(score, abs=1e-9) and row["mean_nfe"] == pytest.approx(m)

    out2 = tmp_path / "h2.json"
    assert th.main([*args, "--out", str(out2), "--family", str(fam)]) == 0
    assert json.loads(out2.read_text())["score_matrix"] == S  # same tables, same noise seeds: same images
