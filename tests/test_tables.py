"""Hand-made sigma tables: ``sigmas:`` methods, the shift and two-phase families, ``eval --tables``."""

import json

import pytest
import torch
from conftest import small_overrides
from tpdm_rl.rollout.sampler import MethodSampler

from tpdm_rl.cli import main
from tpdm_rl.core.methods import Method, MethodError, parse_method, parse_methods
from tpdm_rl.core.tables import TableError, check_table, load_family, shift_table, two_phase_table

PROMPTS = ["a red apple on a table", "a blue car in the rain", "a cat on a sofa"]


def test_sigmas_in_a_method_list_take_the_numbers_that_follow():
    ms = parse_methods("tpm,sigmas:1,0.9,0.5,0,fixed:4")
    assert [m.kind for m in ms] == ["tpm", "sigmas", "fixed"]
    assert ms[1].table == (1.0, 0.9, 0.5, 0.0) and ms[1].steps == 3
    assert ms[1].name == "sigmas:1,0.9,0.5,0"
    assert parse_method(ms[1].name) == ms[1]  # names round-trip (eval reads methods back by name)
    two = parse_methods("sigmas:1,0.5,0,sigmas:1,0.8,0.4,0")
    assert [m.steps for m in two] == [2, 3]
    with pytest.raises(MethodError, match="must end at 0"):  # a non-number ends the table: 'x' is not part of it
        parse_methods("sigmas:1,0.5,x,0")


@pytest.mark.parametrize("text, why", [
    ("sigmas:1,0.5,0.6,0", "not strictly decreasing"), ("sigmas:1,0.5,0.1", "must end at 0"),
    ("sigmas:1.5,0.5,0", "outside"), ("sigmas:", "empty"), ("sigmas:1,x,0", "not a number"),
    ("sigmas:0", "at least two"), ("sigmas:1,nan,0", "outside")])
def test_bad_tables_are_one_line_errors(text, why):
    with pytest.raises(MethodError, match=why) as exc:
        parse_method(text)
    assert "\n" not in str(exc.value)


def test_bad_table_on_the_cli_is_a_one_line_error_before_loading(capsys):
    rc = main(["eval", "--checkpoint", "/nonexistent", "--output", "/tmp/x", "--methods", "tpm,sigmas:1,0.5,0.7,0"])
    err = capsys.readouterr().err
    assert rc == 2 and "not strictly decreasing" in err and len(err.strip().splitlines()) == 1
    rc = main(["eval", "--checkpoint", "/nonexistent", "--output", "/tmp/x", "--tables", "shift:zero"])
    err = capsys.readouterr().err
    assert rc == 2 and "shift:zero" in err and len(err.strip().splitlines()) == 1


def test_families():
    assert shift_table(3.0, 4) == pytest.approx((1.0, 0.9, 0.75, 0.5, 0.0))
    assert two_phase_table(2, 3, 0.9) == pytest.approx((1.0, 0.95, 0.9, 0.6, 0.3, 0.0))
    for n in (1, 2, 5, 9):
        assert len(shift_table(10.0, n)) == n + 1 and check_table(shift_table(10.0, n))
    for name in ("builtin:toy", "builtin:toy-places"):  # both shipped families: one valid table per NFE
        fam = load_family(name)
        assert fam and all(len(t) == n + 1 and t[-1] == 0.0 for n, t in fam.items())
    assert set(load_family("builtin:toy-places")) == set(range(1, 9))
    assert set(load_family("shift:3")) == set(range(1, 29))
    with pytest.raises(TableError, match="unknown table family"):
        load_family("nope")


def test_family_file_errors(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"tables": {"2": [1, 0.5, 0]}}))
    assert load_family(str(good)) == {2: (1.0, 0.5, 0.0)}
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"3": [1, 0.5, 0]}))
    with pytest.raises(TableError, match="has 2 steps"):
        load_family(str(bad))
    bad.write_text("[1, 2")
    with pytest.raises(TableError, match="not a JSON object"):
        load_family(str(bad))


def test_sigmas_method_follows_its_table_exactly(backbone):
    sampler = MethodSampler(backbone, 64, 64, batch_size=4)
    m = Method.sigmas((1.0, 0.9, 0.75, 0.5, 0.0))
    out = sampler.run(m, PROMPTS, [1, 2, 3])
    assert out.nfe.tolist() == [4, 4, 4]
    for s in out.sigmas:
        torch.testing.assert_close(s, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    # shift_table(3, 4) is the same table, so the same images
    again = sampler.run(Method.sigmas(shift_table(3.0, 4)), PROMPTS, [1, 2, 3])
    torch.testing.assert_close(again.images, out.images, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone_dir):
    from tpdm_rl.core.config_io import load_config
    from tpdm_rl.training.controller import Controller

    out = tmp_path_factory.mktemp("tablesrun")
    cfg = load_config("configs/tiny.yaml", small_overrides(tiny_backbone_dir, **{
        "policy.action": "stop-ratio", "policy.init_table": "[1,0.8,0.5,0]"}))
    Controller(cfg, output=out).train()
    return out / "checkpoints" / "step_2"


def test_eval_with_a_table_family_compares_at_equal_nfe(trained, tmp_path, capsys):
    fam = tmp_path / "fam.json"
    fam.write_text(json.dumps({"tables": {"2": [1, 0.6, 0], "3": [1, 0.8, 0.5, 0], "4": [1, 0.9, 0.75, 0.5, 0]}}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", str(trained), "--prompts", str(prompts), "--methods",
               "tpm,sigmas:1,0.7,0.3,0", "--output", str(out), "--pareto-steps", "2,4", "--tables", str(fam),
               "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "results.json").read_text())
    assert rep["tables"] == str(fam)  # the family's name, not the tpm-mean tables
    assert [r["nfe_table"] for r in rep["tables_curve"]] == [2, 3, 4]
    assert [r["nfe"]["mean"] for r in rep["tables_curve"]] == [2, 3, 4]
    rows = {r["method"]: r for r in rep["methods"]}
    assert rows["sigmas:1,0.7,0.3,0"]["nfe"]["mean"] == 3
    tpm_nfe = rows["tpm"]["nfe"]["mean"]
    c = rep["comparisons"]["fidelity"]["tables"]
    if 2 <= tpm_nfe <= 4:
        assert c is not None and c["nfe"] == pytest.approx(tpm_nfe)
    else:
        assert c is None
    assert "tables" in (out / "results.md").read_text()


def test_sample_and_pipeline_run_a_table(trained, tmp_path, capsys):
    from tpdm_rl.rollout.pipeline import TPDMPipeline

    png = tmp_path / "t.png"
    assert main(["sample", "--checkpoint", str(trained), "--prompt", PROMPTS[0], "--output", str(png),
                 "--method", "sigmas:1,0.6,0.2,0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert png.is_file() and "sigmas: 1.0000 0.6000 0.2000 0.0000" in printed
    pipe = TPDMPipeline.from_pretrained(tpm=trained, device="cpu")
    out = pipe(PROMPTS[:2], seed=[1, 2], method="sigmas:1,0.6,0.2,0")
    assert out.nfe.tolist() == [3, 3]
    assert main(["sample", "--checkpoint", str(trained), "--prompt", PROMPTS[0], "--output", str(png),
                 "--method", "sigmas:1,2,0", "--device", "cpu"]) == 2


def test_identical_methods_compare_with_z_zero():
    from tpdm_rl.evaluation.compare import at_equal_nfe

    x = torch.tensor([0.5, 0.7, 0.9])
    assert at_equal_nfe(x, 5.0, {5: x.clone()})["z"] == 0.0
    assert at_equal_nfe(x + 0.1, 5.0, {5: x})["z"] == float("inf")
