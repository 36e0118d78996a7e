"""Reward-model throughput: one batched call on 32 images vs 32 one-image calls, per reward.

On the tiny random fixtures (real file formats, CPU by default) this measures what batching saves
in per-call overhead (preprocessing, tokenising, Python); with ``--real-size`` on a CUDA machine it
also times HPSv2 at full size (open_clip ViT-H-14, random weights, bf16) in images/s.

    python benchmarks/rewards.py [--batch 32] [--resolution 64] [--repeats 3] [--device cpu] [--threads 1]
                                 [--real-size] [--output benchmarks/results/rewards.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the `rewards` package: keep its folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_REWARDS = ("hpsv2", "aesthetic", "pickscore", "clip_score", "imagereward")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(reward) -> None:
    cache = getattr(reward, "text_cache", None)
    if cache is not None:
        cache.clear()  # every timed run pays for its text features


def time_batch_vs_single(reward, images: torch.Tensor, prompts: list[str], repeats: int) -> dict:
    """Median seconds of one ``score`` on the whole batch and of ``len(images)`` one-image calls."""
    reward.score(images[:2], prompts[:2])  # warm-up (lazy inits, allocator)
    batch_t, single_t = [], []
    for _ in range(repeats):
        _reset(reward)
        _sync(reward.device)
        t0 = time.perf_counter()
        reward.score(images, prompts)
        _sync(reward.device)
        batch_t.append(time.perf_counter() - t0)

        _reset(reward)
        t0 = time.perf_counter()
        for i in range(images.shape[0]):
            reward.score(images[i:i + 1], prompts[i:i + 1])
        _sync(reward.device)
        single_t.append(time.perf_counter() - t0)
    b, s = statistics.median(batch_t), statistics.median(single_t)
    n = images.shape[0]
    return {"batch_s": round(b, 5), "single_calls_s": round(s, 5), "ratio_single_over_batch": round(s / b, 2),
            "batch_images_per_s": round(n / b, 1), "single_images_per_s": round(n / s, 1)}


def real_size_hpsv2(batch: int, resolution: int, repeats: int) -> dict:
    """HPSv2 at full size (ViT-H-14, random weights saved like HPS_v2.1_compressed.pt) in bf16."""
    import open_clip
    from tpdm_rl.rewards import build_reward

    folder = Path(tempfile.mkdtemp(prefix="hps_real_"))
    path = folder / "HPS_v2.1_compressed.pt"
    model = open_clip.create_model("ViT-H-14", pretrained=None)
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, path)
    del model
    reward = build_reward("hpsv2", checkpoint=str(path), device="cuda", dtype="bfloat16", batch_size=batch)
    images = torch.rand(batch, 3, resolution, resolution, device="cuda")
    prompts = [f"benchmark prompt {i % 8}" for i in range(batch)]
    out = time_batch_vs_single(reward, images, prompts, repeats)
    out.update(model="ViT-H-14", dtype="bfloat16", resolution=resolution, batch=batch,
               gpu=torch.cuda.get_device_name(0))
    path.unlink(missing_ok=True)
    folder.rmdir()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=64, help="input image size (the tiny models use 32 px)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the reward actor's default is 1)")
    ap.add_argument("--rewards", default=",".join(MODEL_REWARDS))
    ap.add_argument("--real-size", action="store_true", help="also time ViT-H-14 HPSv2 in bf16 (needs CUDA)")
    ap.add_argument("--real-resolution", type=int, default=1024)
    ap.add_argument("--output", default="benchmarks/results/rewards.json")
    args = ap.parse_args()
    from tpdm_rl.core.threads import apply_threads

    apply_threads(args.threads, "benchmark")

    from tpdm_rl.rewards import build_reward

    from tpdm_rl.builders.reward_fixtures import make_all

    tmp = tempfile.TemporaryDirectory(prefix="tiny_rewards_")
    opts = make_all(Path(tmp.name), seed=0)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=gen)
    prompts = [f"benchmark prompt {i % 8}" for i in range(args.batch)]
    results: dict = {"config": {"batch": args.batch, "resolution": args.resolution, "repeats": args.repeats,
                                "device": args.device, "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "machine": platform.machine()},
                     "tiny": {}}
    print(f"{'reward':<12} {'batch s':>9} {'32 single s':>12} {'ratio':>7} {'img/s batch':>12} {'img/s single':>13}")
    for name in [r for r in args.rewards.split(",") if r]:
        reward = build_reward(name, device=args.device, dtype="float32", batch_size=args.batch, **opts[name])
        r = time_batch_vs_single(reward, images.to(reward.device), prompts, args.repeats)
        results["tiny"][name] = r
        print(f"{name:<12} {r['batch_s']:>9.4f} {r['single_calls_s']:>12.4f} {r['ratio_single_over_batch']:>6.1f}x "
              f"{r['batch_images_per_s']:>12.1f} {r['single_images_per_s']:>13.1f}")

    if args.real_size:
        if torch.cuda.is_available():
            r = real_size_hpsv2(args.batch, args.real_resolution, args.repeats)
            results["real_size_hpsv2"] = r
            print(f"HPSv2 ViT-H-14 bf16 on {r['gpu']}: batch {r['batch_images_per_s']} img/s, "
                  f"single {r['single_images_per_s']} img/s ({r['ratio_single_over_batch']}x)")
        else:
            results["real_size_hpsv2"] = "skipped: no CUDA device"
            print("--real-size skipped: no CUDA device")

    tmp.cleanup()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
