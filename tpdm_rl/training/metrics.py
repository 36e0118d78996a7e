"""The metric catalogue: every key of ``metrics.jsonl`` with its unit and meaning (``METRICS``), and the
generated docs/metrics.md. Writing the metrics: ``metrics_logger.py``; reading them: ``metrics_reader.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpdm_rl.core.reward_registry import reward_class, reward_names


@dataclass(frozen=True)
class Metric:
    """One logged metric: its key (``<name>`` is a reward component, ``<extra>`` one of its extras), unit and
    meaning. Every iteration logs the same keys in one process and on Ray."""

    key: str
    unit: str
    description: str


#: every key of ``metrics.jsonl``; docs/metrics.md is generated from it (``python -m tpdm_rl.commands.reference``), and
#: tests/test_docs.py checks it against the keys a real iteration logs. One line per key: key | unit | meaning.
_CATALOGUE = """
iteration                  | index             | iteration number, from 0
reward/total               | reward            | mean over the iteration's trajectories of the total reward R (weighted, normalised components combined with the step penalty, as `summary.txt` spells out)
reward/<name>              | the reward's unit | mean raw score of component `<name>` (before weight and normalisation)
reward/<name>_<extra>      | the extra's unit  | mean of a per-image extra the component reports but does not reward (e.g. `reward/shapes_exact`)
reward/step_penalty        | coef x steps      | `step_penalty.coef` x mean steps (additive mode; 0 otherwise)
steps/mean                 | steps             | mean steps per trajectory (steps = NFE)
steps/min                  | steps             | fewest steps of a trajectory
steps/max                  | steps             | most steps of a trajectory
steps/std                  | steps             | standard deviation of the steps (0 for one trajectory)
steps/prompt_spread        | steps             | std over the iteration's prompts of each prompt's mean steps: rises above its sampling floor (about `steps/group_std` / sqrt(group size)) when the policy gives different prompts different step counts
steps/group_std            | steps             | mean std of the steps within a prompt's group: the exploration left to learn from
loss/policy                | loss              | PPO-clip policy loss, mean over the applied optimiser steps
loss/kl_ref                | nats              | KL divergence of the TPM from the initial TPM per step, mean over the applied optimiser steps
policy/clipfrac            | fraction          | fraction of valid steps whose ratio was clipped
policy/first_step_clipfrac | fraction          | clip fraction of the first minibatch (0 when on-policy)
policy/approx_kl           | nats              | approximate KL between the behaviour and the updated TPM
policy/ratio_mean          | ratio             | mean importance ratio over valid steps
policy/entropy             | nats              | mean entropy of the Beta over valid steps
policy/grad_norm           | L2 norm           | gradient norm before clipping to `algorithm.max_grad_norm`
policy/behaviour_logp_err  | nats              | largest difference between the rollout's and the learner's log-probs of the same actions before the update (~1e-7)
policy/version             | count             | TPM version after this iteration's update (one per applied update)
time/iteration_s           | s                 | wall-clock time of the iteration
time/rollout_and_score_s   | s                 | rollouts and reward scoring together (they overlap on Ray)
time/rollout_s             | s                 | time the rollout engine ran (generation, including fidelity references)
time/reference_s           | s                 | part of the rollouts spent on fidelity reference images
time/reward_s              | s                 | time the reward models were busy, summed over components
time/reward_<name>_s       | s                 | time component `<name>`'s models were busy
time/reward_wait_s         | s                 | scoring time not hidden behind the rollouts
time/rollout_worker_busy_s | s                 | busy time per rollout worker
time/learn_s               | s                 | learner update (0 when the update is skipped)
time/sync_s                | s                 | weight sync to the rollout workers
throughput/images_per_s    | images/s          | trajectories finished per second of rollout time
rollout/trajectories       | count             | trajectories generated in the iteration
rollout/backbone_calls     | count             | transformer calls (CFG counted once)
rollout/reference_share    | fraction          | share of the rollout's slot-steps spent on fidelity references
rewards/<name>_calls       | count             | scoring calls made to component `<name>`
learner/ranks              | count             | learner processes (DeepSpeed ranks on Ray, 1 in one process)
learner/rows               | count             | learner rows (valid and masked steps) in the update
health/skipped_updates     | count             | updates skipped so far in the run (non-finite reward, loss or gradient)
health/skipped_steps       | count             | optimiser steps skipped in this update (non-finite loss or gradient)
health/actor_restarts      | count             | rollout and reward actors replaced so far in the run (Ray)
health/nonfinite_reward    | text              | only when a score is not finite: the first one, `name=value`
"""
METRICS: tuple[Metric, ...] = tuple(Metric(*(cell.strip() for cell in line.split("|", 2)))
                                    for line in _CATALOGUE.strip().splitlines())

#: units of the per-image extras a reward reports (``score_details``)
EXTRA_UNITS = {"exact": "fraction"}

_BY_KEY = {m.key: m for m in METRICS if "<" not in m.key}
_BY_PATTERN = {m.key: m for m in METRICS if "<" in m.key}


def metric_info(key: str) -> Metric | None:
    """The catalogue entry of a logged key, with ``<name>`` / ``<extra>`` filled in and the reward's unit; None
    for a key the catalogue does not describe."""
    if key in _BY_KEY:
        return _BY_KEY[key]
    names = reward_names()
    head, _, rest = key.partition("/")
    for name in sorted(names, key=len, reverse=True):
        if head == "reward" and rest == name:
            pattern, unit = "reward/<name>", reward_class(name).unit
        elif head == "reward" and rest.startswith(name + "_"):
            pattern, unit = "reward/<name>_<extra>", EXTRA_UNITS.get(rest[len(name) + 1:], "")
        elif key in (f"time/reward_{name}_s", f"rewards/{name}_calls"):
            pattern = key.replace(name, "<name>")
            unit = _BY_PATTERN[pattern].unit
        else:
            continue
        return Metric(key, unit, _BY_PATTERN[pattern].description.replace("<name>", name))
    return None


def metric_unit(key: str) -> str:
    """The unit of a logged key ("" when unknown)."""
    info = metric_info(key)
    return info.unit if info is not None else ""


def metrics_markdown() -> str:
    """docs/metrics.md: every key of ``metrics.jsonl`` with its unit, and each reward's unit."""
    out = ["# Metrics reference", "",
           "Generated by `python -m tpdm_rl.commands.reference` from `tpdm_rl/training/metrics.py` (`METRICS`) and the reward "
           "registry; `tests/test_docs.py` fails when this file is stale or when an iteration logs a key the "
           "catalogue lacks.", "",
           "Every iteration writes one line of `DIR/metrics.jsonl` and the same scalars to `DIR/tb/` (and W&B "
           "when configured), with the same keys in one process and on Ray. `<name>` is a reward component of "
           "the config's `rewards:` section.", "", "| key | unit | meaning |", "|---|---|---|"]
    escaped = [(m, m.description.replace("|", "\\|")) for m in METRICS]  # a "|" would end the table cell
    out += [f"| `{m.key}` | {m.unit} | {text} |" for m, text in escaped]
    out += ["", "## Reward units", "", "`reward/<name>` is in the unit of the reward model:", "",
            "| reward | unit |", "|---|---|"]
    out += [f"| `{n}` | {reward_class(n).unit or '-'} |" for n in reward_names()]
    out += ["", "Extras (`reward/<name>_<extra>`): " + ", ".join(f"`{k}` ({v})" for k, v in EXTRA_UNITS.items())
            + "; `shapes` reports `exact` (1 when every constraint of the prompt holds)."]
    return "\n".join(out) + "\n"
