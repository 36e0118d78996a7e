"""Issue 23's BAD and WEAK inputs: each is a one-line error naming the bad value (non-zero exit, no lost data)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import cli_sets, one_line_error, run_cli_in_process, small_overrides

import tpdm_rl.training.checkpoint as checkpoint_mod
from tpdm_rl.core.config import ConfigError
from tpdm_rl.core.config_io import load_config
from tpdm_rl.training.controller import Controller

_sets, _one_line = cli_sets, one_line_error


def _train_args(out, backbone, *extra, **over):
    return ["train", "--config", "configs/tiny.yaml", "--output", str(out), *_sets(small_overrides(backbone, **over)),
            *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone_dir):
    """A finished 1-iteration run; tests copy it before they break it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    r = run_cli_in_process(*_train_args(out, tiny_backbone_dir, **{"train.iterations": 1}))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _copy(trained, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(trained, dst)
    (dst / ".tpdm-rl.lock").unlink(missing_ok=True)
    return dst


def test_resume_without_optimizer_state_is_refused_unless_accepted(trained, tmp_path, tiny_backbone_dir):
    run = _copy(trained, tmp_path)
    (run / "checkpoints" / "step_1" / "optimizer.pt").unlink()
    args = _train_args(run, tiny_backbone_dir, "--resume", "auto", **{"train.iterations": 2})
    line = _one_line(run_cli_in_process(*args), 1)
    assert "optimizer.pt" in line and "step_1" in line and "--fresh-optimizer" in line
    r = run_cli_in_process(*args, "--fresh-optimizer")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fresh optimizer" in r.stderr


def test_a_pickled_optimizer_state_is_refused_without_torchs_unsafe_advice(trained, tmp_path, tiny_backbone_dir):
    run = _copy(trained, tmp_path)
    torch.save({"state": {}, "hook": os.path.join}, run / "checkpoints" / "step_1" / "optimizer.pt")
    line = _one_line(run_cli_in_process(*_train_args(run, tiny_backbone_dir, "--resume", "auto",
                                                     **{"train.iterations": 2})), 1)
    assert "optimizer.pt" in line and "holds pickled objects" in line and "nothing in it was run" in line
    assert "weights_only" not in line and "can still be loaded" not in line and "trust the source" not in line


def test_latest_pointing_into_another_run_is_refused(trained, tmp_path, tiny_backbone_dir):
    other, run = _copy(trained, tmp_path, "other"), _copy(trained, tmp_path, "run")
    (run / "checkpoints" / "latest").write_text("../../other/checkpoints/step_1\n")
    line = _one_line(run_cli_in_process(*_train_args(run, tiny_backbone_dir, "--resume", "auto",
                                                     **{"train.iterations": 2})), 1)
    assert "latest" in line and "outside" in line and str(other.resolve()) in line


def test_allow_config_change_without_resume_is_a_usage_error(tmp_path, tiny_backbone_dir):
    line = _one_line(run_cli_in_process(*_train_args(tmp_path / "r", tiny_backbone_dir, "--allow-config-change",
                                                     "optim.lr")), 2)
    assert "--allow-config-change" in line and "--resume" in line
    assert not (tmp_path / "r").exists()


def test_checkpoint_and_export_weights_are_group_readable(trained, tmp_path):
    old = os.umask(0o022)
    try:
        mode = stat.S_IMODE((trained / "checkpoints" / "step_1" / "tpm.safetensors").stat().st_mode)
        assert mode == 0o644, oct(mode)
        r = run_cli_in_process("export", "--checkpoint", str(trained), "--output", str(tmp_path / "exp"))
        assert r.returncode == 0, r.stderr[-2000:]
        assert stat.S_IMODE((tmp_path / "exp" / "tpm.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_export_into_an_earlier_export_needs_overwrite_and_leaves_nothing_stale(trained, tmp_path):
    exp = tmp_path / "exp"
    assert run_cli_in_process("export", "--checkpoint", str(trained), "--output", str(exp)).returncode == 0
    (exp / "eval_results.md").write_text("# results of the previous model\n")
    before = (exp / "tpm.safetensors").read_bytes()
    line = _one_line(run_cli_in_process("export", "--checkpoint", str(trained), "--output", str(exp)), 1)
    assert "earlier export" in line and "--overwrite" in line and str(exp) in line
    assert (exp / "tpm.safetensors").read_bytes() == before  # nothing replaced
    r = run_cli_in_process("export", "--checkpoint", str(trained), "--output", str(exp), "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (exp / "eval_results.md").exists()  # the previous model's results are gone


def test_a_full_disk_names_the_cause_and_keeps_the_last_checkpoint(tmp_path, tiny_backbone_dir, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):  # as torch does: the ENOSPC write error surfaces as "unexpected pos"
        calls.append(f)
        if len(calls) == 2:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 548288 vs 548176"
                                   ) from None
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_mod.torch, "save", save)
    out = tmp_path / "run"
    line = _one_line(run_cli_in_process(*_train_args(out, tiny_backbone_dir, **{"train.iterations": 2})), 1)
    assert "No space left on device" in line and "step_2" in line and "unexpected pos" not in line
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert not list((out / "checkpoints").glob(".step_*"))


def test_duplicate_yaml_keys_are_an_error_naming_key_and_line(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  iterations: 5\nseed: 1\ntrain:\n  threads: 1\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:4: key 'train' is given twice"):
        load_config(f)


def test_yaml_syntax_error_names_the_line_and_the_reason(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("seed: 0\ntrain:\n  iterations: 5\n  threads: [1, 2\ncheckpoint:\n  every: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "bad.yaml:5:" in msg and "expected ',' or ']'" in msg and "line 4" in msg, msg


def test_empty_config_is_announced(tmp_path, capsys):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing yet\n")
    load_config(f)
    assert "is empty" in capsys.readouterr().err


def test_reward_option_error_names_the_option_not_root():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rewards.fidelity.bogus=1"])
    assert str(e.value).startswith("config error: rewards.fidelity.bogus: unknown option"), str(e.value)


def test_eval_output_that_is_a_file_or_an_earlier_eval_is_refused(trained, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("keep me\n")
    line = _one_line(run_cli_in_process("eval", "--checkpoint", str(trained), "--output", str(f)), 1)
    assert "is a file" in line and str(f) in line and f.read_text() == "keep me\n"
    earlier = tmp_path / "ev"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}\n")
    line = _one_line(run_cli_in_process("eval", "--checkpoint", str(trained), "--output", str(earlier)), 1)
    assert "earlier evaluation" in line and "--overwrite" in line
    assert (earlier / "results.json").read_text() == "{}\n"


def test_an_eval_interrupted_while_plotting_has_no_completion_marker(trained, tmp_path, monkeypatch):
    import tpdm_rl.evaluation.run as run_mod

    args = ["eval", "--checkpoint", str(trained), "--output", str(tmp_path / "ev"), "--methods", "tpm,fixed:4",
            "--pareto-steps", "4,8", "--limit", "2", "--no-progress", "--threads", "1"]
    real = run_mod.plot_grid
    monkeypatch.setattr(run_mod, "plot_grid", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    r = run_cli_in_process(*args)
    assert r.returncode == 130 and (tmp_path / "ev" / "results.md").exists()
    assert not (tmp_path / "ev" / "COMPLETE").exists()
    monkeypatch.setattr(run_mod, "plot_grid", real)
    r = run_cli_in_process(*args, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ev" / "COMPLETE").exists()


@pytest.mark.parametrize("address,expect", [("not-an-address", "is not HOST:PORT"),
                                            ("127.0.0.1:1", "cannot reach the Ray cluster")])
def test_a_bad_ray_address_fails_fast_without_claiming_a_checkpoint(tmp_path, tiny_backbone_dir, address, expect):
    pytest.importorskip("ray")
    line = _one_line(run_cli_in_process(*_train_args(tmp_path / "r", tiny_backbone_dir, "--address", address)), 1)
    assert expect in line and address in line and "checkpointed" not in line


def test_make_toy_backbone_copy_failure_is_one_short_line(tmp_path, monkeypatch):
    import tpdm_rl.builders.toy_backbone as toy

    def copytree(src, dst, **k):
        raise shutil.Error([(f"{src}/f{i}", f"{dst}/f{i}", "[Errno 30] Read-only file system") for i in range(40)])

    monkeypatch.setattr(toy.shutil, "copytree", copytree)
    line = _one_line(run_cli_in_process("make-toy-backbone", str(tmp_path / "toy")), 1)
    assert "Read-only file system" in line and str(tmp_path / "toy") in line and len(line) < 300, line


def test_garbage_model_index_is_named(tmp_path):
    from tpdm_rl.rollout.backbone import Backbone, BackboneError

    (tmp_path / "model_index.json").write_text("this is not json")
    with pytest.raises(BackboneError, match="model_index.json"):
        Backbone(str(tmp_path), device="cpu")


def test_the_controller_takes_a_resolved_backbone_path(tmp_path, tiny_backbone_dir, monkeypatch):
    """The controller builds no backbone: an empty ``backbone.path`` without ``backbone_path`` is a one-line config
    error before anything is written; the applications resolve it (tpdm-rl train, a sweep trial), once the
    start-up checks have passed."""
    from tpdm_rl.builders.tiny_backbone import run_backbone_path

    cfg = load_config("configs/tiny.yaml", small_overrides(tiny_backbone_dir))
    empty = cfg.model_copy(update={"backbone": cfg.backbone.model_copy(update={"path": ""})})
    with pytest.raises(ConfigError, match="backbone.path is empty"):
        Controller(empty, output=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert run_backbone_path(cfg, tmp_path / "run") == tiny_backbone_dir  # a given path is used as is
    tiny = empty.model_copy(update={"backbone": empty.backbone.model_copy(update={"tiny_dir": tiny_backbone_dir})})
    assert run_backbone_path(tiny, tmp_path / "run") == str(Path(tiny_backbone_dir).resolve())  # built already
    calls = []
    monkeypatch.setattr("tpdm_rl.training.controller.make_executor", lambda *a: calls.append(a[1]) or (_ for _ in ()).throw(
        RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):  # a callable is called after the checks, its result used
        Controller(empty, output=tmp_path / "run2", backbone_path=lambda: tiny_backbone_dir)
    assert calls == [tiny_backbone_dir]


def test_a_run_that_failed_before_its_first_iteration_does_not_block_the_retry(tmp_path, tiny_backbone_dir,
                                                                                  monkeypatch):
    cfg = load_config("configs/tiny.yaml", small_overrides(tiny_backbone_dir, **{"train.iterations": 1}))
    first = Controller(cfg, output=tmp_path / "run")
    monkeypatch.setattr(Controller, "run_iteration", lambda self, it: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        first.train()
    monkeypatch.undo()
    r = run_cli_in_process(*_train_args(tmp_path / "run", tiny_backbone_dir, **{"train.iterations": 1}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "failed before its first iteration" in r.stderr


# toy prompts that the shapes reward cannot score: one line, before any model loads (it was a RewardError after
# ~16 s of rollout); the line number counts the file's real lines, comments and blank lines included
BAD_TOY_PROMPTS = ("# toy prompts\n\na red circle on a white background\n# the next line is not in the grammar\n"
                   "\ftwo blue squares on a black background\na photo of a cat\n")


@pytest.mark.parametrize("command", ["train", "config"])
def test_prompts_outside_the_toy_grammar_fail_at_start_up_naming_their_line(tmp_path, monkeypatch, command):
    import tpdm_rl.builders.tiny_backbone as tiny_mod
    import tpdm_rl.training.controller as controller_mod

    def no_model(*a, **k):
        raise AssertionError("the backbone was reached: the prompts were not checked at start-up")

    monkeypatch.setattr(tiny_mod, "resolve_backbone_path", no_model)  # what tpdm-rl train resolves the path with
    monkeypatch.setattr(controller_mod, "make_executor", no_model)
    prompts = tmp_path / "bad.txt"
    prompts.write_text(BAD_TOY_PROMPTS)  # the form feed: str.splitlines() would count one line too many
    out = tmp_path / "run"
    args = ["--config", "configs/toy.yaml", "--set", f"rollout.prompts={prompts}"]
    r = run_cli_in_process(command, *args, *(["--output", str(out)] if command == "train" else []))
    line = _one_line(r, 1 if command == "train" else None)
    assert f"{prompts}:6:" in line, line
    assert "'a photo of a cat'" in line and "toy grammar" in line and "unexpected word 'photo' at word 2" in line
    assert not out.exists()  # nothing written: a retry is not blocked
    # a jsonl file counts its real lines the same way
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"prompt": "a red circle on a white background"}\n\n{"prompt": "two cats"}\n')
    line = _one_line(run_cli_in_process(command, "--config", "configs/toy.yaml", "--set", f"rollout.prompts={jl}",
                                        *(["--output", str(out)] if command == "train" else [])))
    assert f"{jl}:3:" in line and "'two cats'" in line, line


def test_prompts_outside_the_toy_grammar_answer_before_torch_loads(tmp_path):
    """A fresh process: ``tpdm-rl train`` reports the bad line without importing torch (about a second, where it
    used to load the backbone and roll out for ~16 s first)."""
    import subprocess
    import sys

    prompts = tmp_path / "bad.txt"
    prompts.write_text(BAD_TOY_PROMPTS)
    code = ("import sys; from tpdm_rl.cli import main; "
            f"rc = main(['train', '--config', 'configs/toy.yaml', '--set', 'rollout.prompts={prompts}', "
            f"'--output', '{tmp_path / 'run'}']); print('torch loaded:', 'torch' in sys.modules, 'rc:', rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "torch loaded: False rc: 1" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert f"{prompts}:6: prompt 'a photo of a cat' is not in the toy grammar" in r.stderr


def test_the_toy_grammar_is_checked_only_with_the_shapes_reward(tmp_path):
    from tpdm_rl.core.prompts import load_prompts

    prompts = tmp_path / "p.txt"
    prompts.write_text(BAD_TOY_PROMPTS)
    assert load_prompts(prompts)[-1] == "a photo of a cat"  # other rewards score any prompt
    assert len(load_prompts("builtin:toy-train", toy=True)) > 0  # the bundled toy sets parse


def test_truncation_warning_counts_the_runs_distinct_prompts(capsys):
    """The negative prompt (encoded with the run's prompts) is not one of them."""
    from types import SimpleNamespace

    from tpdm_rl.rollout.backbone import Backbone
    from tpdm_rl.rollout.families import SD3Family

    def tok(prompts, add_special_tokens=True):
        return {"input_ids": [[0] * (len(p.split()) + 2) for p in prompts]}

    class Stop(Exception):
        pass

    def encode_prompt(**kw):
        raise Stop

    fake = SimpleNamespace(_embed_cache={}, negative_prompt="", max_sequence_length=6, _text_device="cpu",
                           family=SD3Family(),
                           pipe=SimpleNamespace(tokenizer=tok, tokenizer_3=tok, tokenizer_max_length=6,
                                                encode_prompt=encode_prompt))
    fake._warn_truncated = lambda p: Backbone._warn_truncated(fake, p)
    with pytest.raises(Stop):
        Backbone.encode_prompts.__wrapped__(fake, ["a b c d e f g h", "a b c d e f g h", "a dog", ""])
    err = capsys.readouterr().err
    assert "1 of 2 distinct prompts are longer" in err, err
