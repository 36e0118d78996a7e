"""Issue 30's BAD and WEAK inputs (round 4): each is one line naming the bad value and what was expected, a
non-zero exit, no traceback and no lost data; or a silence / wrong word that is now fixed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_sets, one_line_error, run_cli_in_process, small_overrides

ROOT = Path(__file__).resolve().parent.parent


_sets, _one_line = cli_sets, one_line_error


#: a 1-iteration run on the shipped toy backbone, as small as it gets
TOY_SMALL = ["train.iterations=1", "rollout.prompts_per_iteration=1", "rollout.group_size=2", "rollout.batch_size=2",
             "rollout.max_steps=6", "eval.enabled=false", "logging.progress=false", "logging.tensorboard=false",
             "train.threads=1", "policy.hidden=16", "checkpoint.every=1"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished 1-iteration run on ``builtin:toy`` (tests copy it before they change it)."""
    out = tmp_path_factory.mktemp("toy") / "run"
    r = run_cli_in_process("train", "--config", "configs/toy.yaml", "--output", str(out), *_sets(TOY_SMALL))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_backbone_dir):
    out = tmp_path_factory.mktemp("tiny") / "run"
    r = run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(out),
                           *_sets(small_overrides(tiny_backbone_dir, **{"train.iterations": 1})))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


# ---------------------------------------------------------------------------- BAD 1: two evals into one folder
def test_a_second_eval_into_a_folder_in_use_is_refused_at_once(tiny_run, tmp_path):
    from tpdm_rl.training.runfolder import lock_folder, unlock_folder

    out = tmp_path / "eval"
    held = lock_folder(out, "eval folder", "wait")  # what a running `tpdm-rl eval` holds (another open file)
    try:
        r = run_cli_in_process("eval", "--checkpoint", str(tiny_run), "--output", str(out), "--methods", "fixed:2",
                               "--pareto-steps", "2", "--limit", "1", "--no-progress", "--threads", "1")
        line = _one_line(r, 1)
        assert "eval folder" in line and "is in use by pid" in line and str(out) in line, line
        assert sorted(p.name for p in out.iterdir()) == [".tpdm-rl.lock"]  # nothing written beside the owner
    finally:
        unlock_folder(held)
    # once the owner is gone the folder is free again, and the evaluation holds the lock while it runs
    seen = {}
    import tpdm_rl.evaluation.run as run_mod

    real = run_mod._evaluate

    def spy(*a, **k):
        try:
            lock_folder(out, "eval folder", "wait")
        except Exception as exc:  # noqa: BLE001
            seen["refused"] = str(exc)
        return real(*a, **k)

    run_mod._evaluate = spy
    try:
        r = run_cli_in_process("eval", "--checkpoint", str(tiny_run), "--output", str(out), "--methods", "fixed:2",
                               "--pareto-steps", "2", "--limit", "1", "--no-progress", "--threads", "1")
    finally:
        run_mod._evaluate = real
    assert r.returncode == 0, r.stderr[-2000:]
    assert "is in use by pid" in seen.get("refused", ""), seen
    assert (out / "COMPLETE").is_file()


# ---------------------------------------------------------------------------- BAD 2: builtin backbone names
def test_builtin_backbones_are_accepted_and_recorded_by_name(toy_run, tmp_path):
    from tpdm_rl.training.tpm_file import locate_tpm, read_tpm_meta

    meta = json.loads(read_tpm_meta(locate_tpm(toy_run))["inference"])
    assert meta["backbone_path"] == "builtin:toy", meta["backbone_path"]  # not the clone's absolute path
    png = tmp_path / "s.png"
    r = run_cli_in_process("sample", "--checkpoint", str(toy_run), "--backbone", "builtin:toy", "--prompt",
                           "a red circle on a white background", "--output", str(png), "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.is_file()
    ev = tmp_path / "eval"
    r = run_cli_in_process("eval", "--checkpoint", str(toy_run), "--backbone", "builtin:toy", "--output", str(ev),
                           "--prompts", "builtin:toy-heldout", "--limit", "1", "--methods", "tpm,fixed:4",
                           "--pareto-steps", "4", "--rewards", "shapes", "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((ev / "results.json").read_text())["backbone"] == "builtin:toy"
    # an export names the backbone by its builtin name and works from another folder
    exp = tmp_path / "export"
    assert run_cli_in_process("export", "--checkpoint", str(toy_run), "--output", str(exp)).returncode == 0
    cfg = json.loads((exp / "tpdm_config.json").read_text())
    assert cfg["inference"]["backbone_path"] == "builtin:toy"
    assert str(ROOT) not in (exp / "tpdm_config.json").read_text().split('"training_config"')[0]
    moved = tmp_path / "elsewhere" / "export"
    shutil.copytree(exp, moved)
    code = ("from tpdm_rl.rollout.pipeline import TPDMPipeline; "
            f"p = TPDMPipeline.from_pretrained(tpm={str(moved)!r}, device='cpu'); "
            "print('backbone', p.settings['backbone_path'])")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                         timeout=300)
    assert "backbone builtin:toy" in res.stdout, res.stderr[-2000:]


def test_older_tpm_files_naming_the_shipped_folder_are_read_as_the_builtin_name(tmp_path):
    from tpdm_rl.rollout.toy import builtin_name, shipped_toy_dir

    assert builtin_name(str(shipped_toy_dir("builtin:toy"))) == "builtin:toy"
    assert builtin_name("/home/someone/clone/tpdm_rl/data/toy_places_backbone") == "builtin:toy-places"
    assert builtin_name("builtin:toy") == "builtin:toy" and builtin_name("/tmp/x") is None


def test_an_unknown_builtin_backbone_is_one_line(toy_run, tmp_path):
    r = run_cli_in_process("sample", "--checkpoint", str(toy_run), "--backbone", "builtin:toys", "--prompt",
                           "a red circle on a white background", "--output", str(tmp_path / "s.png"))
    line = _one_line(r)
    assert "'builtin:toys'" in line and "builtin:toy-places" in line, line


# ---------------------------------------------------------------------------- WEAK: one validation pass
@pytest.mark.parametrize("override,expect", [
    ("eval.methods=tpm,sigmas:1,0.5", "eval.methods: bad method sigmas: sigma table '1,0.5' must end at 0"),
    ("eval.tables=shift:-1", "eval.tables: table family 'shift:-1'"),
    ("eval.rewards=nosuch", "eval.rewards: unknown reward 'nosuch'"),
    ("eval.prompts=/no/such/prompts.txt", "eval.prompts: /no/such/prompts.txt"),
    ("eval.pareto_steps=[0,4]", "eval.pareto_steps"),
])
def test_eval_values_of_a_training_config_are_checked_before_anything_loads(tmp_path, override, expect):
    out = tmp_path / "run"
    r = run_cli_in_process("train", "--config", "configs/toy.yaml", "--output", str(out), "--set", override)
    line = _one_line(r)
    assert expect in line, line
    assert not out.exists()  # was: a traceback after 60 iterations


def test_a_yaml_or_override_typo_names_the_closest_key(tmp_path):
    for key, close in (("optim.lrr=1e-3", "'optim.lr'"), ("rolout.batch_size=4", "'rollout'"),
                       ("train.iteratons=3", "'train.iterations'"), ("rewards.shapes.wieght=1", "'weight'")):
        line = _one_line(run_cli_in_process("config", "--config", "configs/toy.yaml", "--set", key), 2)
        assert f"did you mean {close}" in line, line
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  iteratons: 3\n")
    line = _one_line(run_cli_in_process("train", "--config", str(cfg), "--output", str(tmp_path / "r")), 2)
    assert "train.iteratons: unknown key; did you mean 'train.iterations'?" in line, line
    cfg.write_text("optim:\n  zzz: 3\n")  # nothing close: the keys the section takes
    line = _one_line(run_cli_in_process("config", "--config", str(cfg)), 2)
    assert "optim.zzz: unknown key; expected one of lr, weight_decay, betas, eps" in line, line


def test_allow_config_change_and_sweep_grid_keys_get_suggestions(tmp_path):
    line = _one_line(run_cli_in_process("train", "--config", "configs/toy.yaml", "--output", str(tmp_path / "r"),
                                        "--resume", "auto", "--allow-config-change", "step_penalty.coeff"), 2)
    assert "--allow-config-change 'step_penalty.coeff': not a config key; did you mean 'step_penalty.coef'?" in line
    assert not (tmp_path / "r").exists()
    line = _one_line(run_cli_in_process("sweep", "--config", "configs/tiny.yaml", "--grid", "step_penalty.coeff=0,1",
                                        "--output", str(tmp_path / "sw")), 2)
    assert "step_penalty.coeff: unknown key; did you mean 'step_penalty.coef'?" in line, line
    assert not (tmp_path / "sw").exists()


# ---------------------------------------------------------------------------- WEAK: nonsense refused
@pytest.mark.parametrize("args,expect", [
    (["--set", "train.iterations=1000000000000"], "train.iterations: Input should be less than or equal to 1000000"),
    (["--set", "rewards.shapes.weight=0"], "rewards: every weight is 0 (rewards.shapes.weight)"),
    (["--fresh-optimizer"], "--fresh-optimizer needs --resume"),
])
def test_nonsense_training_options_are_refused(tmp_path, args, expect):
    out = tmp_path / "run"
    line = _one_line(run_cli_in_process("train", "--config", "configs/toy.yaml", "--output", str(out), *args), 2)
    assert expect in line, line
    assert not out.exists()


def test_sweep_budget_and_grid_prompts_are_checked_before_any_work(tmp_path, toy_run):
    line = _one_line(run_cli_in_process("sweep", "--config", "configs/tiny.yaml", "--grid", "step_penalty.coef=0,1",
                                        "--output", str(tmp_path / "sw"), "--budget", "-3"), 2)
    assert "--budget -3: expected a mean number of steps > 0" in line
    assert not (tmp_path / "sw").exists()  # was: the whole sweep ran first
    line = _one_line(run_cli_in_process("eval", "--checkpoint", str(toy_run), "--output", str(tmp_path / "e"),
                                        "--grid-prompts", "0"), 2)
    assert "--grid-prompts must be >= 1" in line


# ---------------------------------------------------------------------------- WEAK: toy prompts in sample and API
@pytest.mark.parametrize("prompt,expect", [
    ("a red circle in the middle", "unexpected word 'middle'"),
    ("two red circles in the top left", "only a group of one may carry a place"),
    ("a red circle in the top left and a blue square in the top left on a white background",
     "two objects are placed in the top left"),
    ("a red circle on a white background ☃", "unexpected word '☃'"),
    ("", "unexpected empty word"),
    ("a red apple on a table", "unexpected word 'apple'"),
    ("a red circle in the top left on a white background", "draws the reading-order world, which has no places"),
])
def test_sample_refuses_prompts_outside_the_toy_backbones_world_before_loading(toy_run, tmp_path, prompt, expect):
    png = tmp_path / "s.png"
    line = _one_line(run_cli_in_process("sample", "--checkpoint", str(toy_run), "--prompt", prompt, "--output",
                                        str(png)), 2)
    assert expect in line and "builtin:toy" in line, line
    assert not png.exists()


def test_the_pipeline_refuses_prompts_outside_the_toy_world(toy_run):
    from tpdm_rl.rollout.pipeline import TPDMPipeline

    from tpdm_rl.core.toyworld import PromptError

    pipe = TPDMPipeline.from_pretrained(tpm=toy_run, device="cpu")
    with pytest.raises(PromptError, match="'a red apple on a table' is not in the toy grammar"):
        pipe(["a red circle on a white background", "a red apple on a table"], seed=0)
    assert int(pipe("a red circle on a white background", seed=0).steps[0]) >= 1


# ---------------------------------------------------------------------------- WEAK: tracebacks -> one line
def test_a_forced_family_that_does_not_fit_the_folder_is_one_line(tiny_backbone_dir):
    from tpdm_rl.rollout.families import FamilyError, detect_family

    with pytest.raises(FamilyError, match="backbone.family 'flux' does not fit .* StableDiffusion3Pipeline"):
        detect_family(tiny_backbone_dir, "flux")
    assert detect_family(tiny_backbone_dir, "sd3") == "sd3"


def test_cuda_without_a_gpu_and_an_absurd_size_are_one_line(toy_run, tmp_path, monkeypatch):
    import torch

    from tpdm_rl.core.devices import DeviceError, resolve_device

    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="'cuda' requested but this machine has 0 CUDA"):
            resolve_device("cuda")  # was a RuntimeError deep inside .to("cuda")
        line = _one_line(run_cli_in_process("sample", "--checkpoint", str(toy_run), "--prompt",
                                            "a red circle on a white background", "--output", str(tmp_path / "a.png"),
                                            "--device", "cuda"), 2)
        assert "--device 'cuda' requested but this machine has" in line, line
    line = _one_line(run_cli_in_process("sample", "--checkpoint", str(toy_run), "--prompt",
                                        "a red circle on a white background", "--output", str(tmp_path / "a.png"),
                                        "--size", "100000"), 2)
    assert "--size 100000: expected an image size from 16 to 4096 pixels" in line


# ---------------------------------------------------------------------------- WEAK: misleading messages
def test_address_auto_without_a_cluster_says_so(monkeypatch):
    import ray

    from tpdm_rl.executors.ray_pool import RayAddressError, init_ray

    def no_cluster(*a, **k):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(RayAddressError, match="--address auto: no running Ray cluster was found"):
        init_ray("auto")


def test_export_refuses_an_evaluation_without_its_complete_marker(tiny_run, tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "results.md").write_text("# Evaluation\n\nhalf written\n")
    line = _one_line(run_cli_in_process("export", "--checkpoint", str(tiny_run), "--output", str(tmp_path / "x"),
                                        "--eval", str(ev)), 1)
    assert "did not finish (no COMPLETE marker" in line, line
    assert not (tmp_path / "x").exists()
    (ev / "COMPLETE").write_text("evaluation complete\n")
    assert run_cli_in_process("export", "--checkpoint", str(tiny_run), "--output", str(tmp_path / "x"), "--eval",
                              str(ev)).returncode == 0


# ---------------------------------------------------------------------------- WEAK: slow to fail
@pytest.mark.parametrize("command", [
    ["eval", "--methods", "tpm,sigmas:1,0.5", "--output", "{tmp}/e"],
    ["sample", "--method", "sigmas:1,0.5", "--prompt", "a red circle on a white background", "--output", "{tmp}/a.png"],
    ["sample", "--prompt", "a red apple on a table", "--output", "{tmp}/a.png"],
])
def test_argument_errors_answer_before_torch_loads(toy_run, tmp_path, command):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command] + ["--checkpoint", str(toy_run)]
    code = (f"import sys; from tpdm_rl.cli import main; rc = main({args!r}); "
            "print('torch loaded:', 'torch' in sys.modules, 'rc:', rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "torch loaded: False rc: 2" in r.stdout, (r.stdout, r.stderr[-2000:])  # was 7-8 s: torch + checkpoint


# ---------------------------------------------------------------------------- WEAK: wrong words
def test_the_model_card_of_a_stop_ratio_toy_tpm_describes_it(toy_run, tmp_path):
    exp = tmp_path / "export"
    assert run_cli_in_process("export", "--checkpoint", str(toy_run), "--output", str(exp)).returncode == 0
    card = (exp / "README.md").read_text()
    assert "mode of a Beta" not in card and "stop head" in card
    assert "apple" not in card and "builtin:eval" not in card
    assert "builtin:toy-heldout" in card and "--rewards shapes" in card and "builtin:toy`" in card


def test_help_texts_name_flux_and_tpm_mean():
    r = run_cli_in_process("--help")
    assert "FLUX.1" in r.stdout and "TPDM on SD3)" not in r.stdout
    r = run_cli_in_process("eval", "--help")
    assert "tpm-mean" in " ".join(r.stdout.split())


def test_the_toy_config_and_the_readme_agree_on_the_run_time():
    import re

    cfg = (ROOT / "configs" / "toy.yaml").read_text().split("seed:")[0]
    readme = (ROOT / "README.md").read_text()
    said = re.findall(r"~?(\d+) minutes", cfg)
    assert said, cfg
    assert f"~{said[0]} minutes" in readme, (said, "README quick start")


# ---------------------------------------------------------------------------- WEAK: silences and pictures
def test_make_random_backbone_says_what_it_writes_before_writing_it(tmp_path):
    import tpdm_rl.builders.random_backbone as rb

    said = []
    rb.make_random_backbone(tmp_path / "b", "sd3.5-medium", no_t5=True, dtype="float32", layers=1,
                            overrides=rb.shrunk_overrides(attention_head_dim=8, sample_size=8), progress=said.append)
    starts = [i for i, s in enumerate(said) if "building and writing" in s]
    ends = [i for i, s in enumerate(said) if s.endswith(" s)") and "written" in s]
    assert starts and len(starts) == len(ends) and all(a < b for a, b in zip(starts, ends)), said
    assert said[starts[0]].startswith(said[ends[0]].split(":")[0])  # announced, then done, component by component


def test_the_eval_bar_moves_batch_by_batch_on_fixed_tables(monkeypatch):
    from types import SimpleNamespace

    import torch
    from tpdm_rl.rollout.sampler import MethodSampler

    from tpdm_rl.core.methods import Method

    def fake(self, m, p, s, decode, table=None):
        n = len(p)
        return SimpleNamespace(images=torch.zeros(n, 3, 2, 2), latents=torch.zeros(n, 1), nfe=torch.ones(n).long(),
                               steps=torch.ones(n).long(), sigmas=[torch.ones(2)] * n, called=[torch.ones(1)] * n)

    sampler = MethodSampler.__new__(MethodSampler)
    sampler.batch_size = 32
    monkeypatch.setattr(MethodSampler, "_run_engine", fake)
    seen: list[int] = []
    sampler.run(Method("fixed", steps=28), ["p"] * 200, list(range(200)), progress=seen.append)
    assert seen[0] == 32 and sum(seen) == 200, seen  # was 128 images (four batches of 28 steps) at 0%
    seen.clear()
    sampler.run(Method("tpm"), ["p"] * 200, list(range(200)), progress=seen.append)
    assert seen[0] == 128  # the TPM keeps its larger chunks: continuous batching refills finished slots


def test_the_sweep_turns_off_tunes_metric_boxes(monkeypatch, tmp_path):
    import tpdm_rl.sweep.tune as tune_mod

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    monkeypatch.setattr(tune_mod, "init_ray", stop)
    with pytest.raises(Stop):
        tune_mod._run_tune(tmp_path, [], {}, {}, 0, None, "none", "reward/total", print)
    import os

    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # the legacy reporter at verbose=0 prints no result boxes


def _pareto_report(tpm_point: tuple[float, float]):
    def ms(m, se=0.004):
        return {"mean": m, "se": se}

    def row(method, nfe, q, ref=False):
        return {"method": method, "is_reference": ref, "nfe": {"mean": nfe, "min": int(nfe), "max": int(nfe)},
                "rewards": {"shapes": ms(q)}, "psnr": ms(10 + nfe, 0.3), "ssim": ms(0.5, 0.01)}

    methods = [row("tpm", *tpm_point), row("tpm-mean:5", 5.0, 0.86), row("fixed:28", 28, 0.9, True)]
    return {"reference": "fixed:28", "rewards": ["shapes"], "num_images": 8, "resolution": 64, "methods": methods,
            "pareto": [row(f"fixed:{n}", n, 0.5 + 0.01 * n, n == 28) for n in (2, 4, 8, 28)]}


def test_the_tpm_point_is_drawn_on_top_of_a_coinciding_tpm_mean_point():
    import matplotlib.pyplot as plt

    from tpdm_rl.evaluation.plots import pareto_figure

    fig = pareto_figure(_pareto_report((5.0, 0.86)), ["tpm", "tpm-mean:5", "fixed:28"])
    ax = fig.axes[0]
    lines = {c.get_label(): c[0] for c in ax.containers}
    tpm, mean = lines["tpm"], lines["tpm-mean:5"]
    assert tpm.get_marker() != mean.get_marker()
    assert tpm.get_zorder() > mean.get_zorder() and tpm.get_markersize() > mean.get_markersize()
    plt.close(fig)


def test_schedules_png_draws_explicit_sigma_tables():
    from types import SimpleNamespace

    import matplotlib.pyplot as plt
    import torch

    from tpdm_rl.evaluation.plots import schedules_figure

    def res(table):
        return SimpleNamespace(sigmas=[torch.tensor(table)] * 2, nfe=torch.tensor([len(table) - 1] * 2),
                               called=[torch.ones(len(table) - 1)] * 2)

    results = {"tpm": res([1.0, 0.6, 0.2, 0.0]), "fixed:28": res([1.0 - i / 28 for i in range(29)]),
               "sigmas:1,0.5,0": res([1.0, 0.5, 0.0])}
    fig = schedules_figure(results, list(results), [(0, 0), (1, 0)], ["a red circle", "a blue square"], 2)
    labels = [ln.get_label() for ln in fig.axes[0].lines]
    assert any(lb.startswith("sigmas:1,0.5,0") for lb in labels), labels
    plt.close(fig)


def test_no_unplaced_objects_axis_on_the_reading_order_world():
    from types import SimpleNamespace

    import torch

    from tpdm_rl.evaluation.run import complexity_report

    prompts = ["a red circle on a white background", "two red circles and a blue square on a black background"]
    r = {"tpm": SimpleNamespace(nfe=torch.tensor([3, 5]), rewards={"shapes": torch.tensor([1.0, 0.5])})}
    cx = complexity_report(r, prompts, ["tpm"])
    assert "nfe_by_unplaced" not in cx and "unplaced" not in cx["spearman_tpm_nfe"]  # objects == unplaced there
    placed = ["a red circle in the top left on a white background", "two red circles on a black background"]
    assert "nfe_by_unplaced" in complexity_report(r, placed, ["tpm"])  # the places world keeps its second axis
