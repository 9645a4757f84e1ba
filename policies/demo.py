"""robomosaic-demo (`make demo`): from nothing to a trained, evaluated lift policy on the CPU.

    robomosaic-demo [quick=true] [episodes=100] [train_steps=2000] [eval_episodes=50] [out_dir=runs/demo]

1. collects `episodes` scripted lift demonstrations into `<out_dir>/lift.zarr` (robomosaic-collect),
2. trains a U-Net policy on them into `<out_dir>/policy` (robomosaic-train; rollouts on selection
   seeds every `selection_every` steps keep the best checkpoint),
3. evaluates `<out_dir>/policy/best` on held-out seeds through the chunk executor
   (robomosaic-eval), writes `<out_dir>/eval.json` and videos under `<out_dir>/videos`,
4. prints the success rate with its 95% interval and where everything is.

quick=true applies `quick_preset` (a two-minute run; lower success is expected); arguments given
beside it still win. Every run starts afresh: the demo replaces what an earlier demo left in
`out_dir` and refuses to touch anything else there.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from robomosaic.conf.console import console_script
from robomosaic.data.store import EpisodeStore, StoreError

STORE, RUN, REPORT, VIDEOS = "lift.zarr", "policy", "eval.json", "videos"


def clear_previous_demo(out_dir: Path) -> None:
    """Remove what an earlier demo wrote in `out_dir`; stop if anything else is there."""
    if not out_dir.exists():
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in {STORE, RUN, REPORT, VIDEOS})
    if foreign:
        raise SystemExit(
            f"robomosaic-demo: {out_dir} holds {', '.join(foreign)}, which the demo did not write; "
            "choose another out_dir="
        )
    if (out_dir / STORE).exists():
        try:
            EpisodeStore.open(out_dir / STORE)
        except StoreError as e:
            raise SystemExit(
                f"robomosaic-demo: {out_dir / STORE} exists and is not an episode store; "
                f"not replacing it ({e})"
            ) from None
    for name in (STORE, RUN, VIDEOS):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    (out_dir / REPORT).unlink(missing_ok=True)


def demo_config(argv: Sequence[str]) -> DictConfig:
    """`conf/demo.yaml` with the arguments; quick=true puts `quick_preset` under the explicit ones."""
    from robomosaic.conf import compose

    cfg = compose("demo", argv)
    if cfg.quick:
        explicit = OmegaConf.from_dotlist([a for a in argv if not a.startswith("quick=")])
        cfg = OmegaConf.merge(cfg, cfg.quick_preset, explicit)
    return cfg


def train_overrides(cfg: DictConfig, store: Path, run: Path) -> list[str]:
    steps = int(cfg.train_steps)
    return [
        "task=lift",
        "policy=unet",
        f"flow={cfg.flow}",
        f"dataset={store}",
        f"out={run}",
        f"seed={cfg.seed}",
        f"train.steps={steps}",
        f"train.batch_size={cfg.batch_size}",
        f"train.eval_every={cfg.selection_every}",
        f"train.eval_episodes={cfg.selection_episodes}",
        f"train.eval_workers={cfg.workers}",
        f"train.checkpoint_every={steps}",
        f"optimizer.warmup_steps={min(200, steps // 10)}",
    ]


@console_script("robomosaic-demo")
def main(argv: list[str]) -> None:
    from robomosaic.conf import compose
    from robomosaic.data.collect import collect
    from robomosaic.policies.evaluate import evaluate, summary_table
    from robomosaic.policies.train import train

    cfg = demo_config(argv)
    started = time.time()
    out_dir = Path(cfg.out_dir)
    clear_previous_demo(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store_path, run, report, videos = out_dir / STORE, out_dir / RUN, out_dir / REPORT, out_dir / VIDEOS

    print(f"[1/3] collecting {cfg.episodes} scripted lift demonstrations into {store_path}")
    collect_args = [f"episodes={cfg.episodes}", f"out={store_path}", f"workers={cfg.workers}"]
    collected = collect(compose("collect", ["task=lift", *collect_args]))
    print(collected.text())
    if collected.stored == 0:
        raise SystemExit("robomosaic-demo: no demonstration was stored")

    print(f"[2/3] training a U-Net {cfg.flow} policy for {cfg.train_steps} steps into {run}")
    trained = train(compose("train", train_overrides(cfg, store_path, run)))

    print(f"[3/3] evaluating {run / 'best'} on {cfg.eval_episodes} held-out seeds")
    result = evaluate(
        run / "best",
        episodes=int(cfg.eval_episodes),
        workers=int(cfg.workers),
        video_episodes=int(cfg.videos),
        video_dir=videos,
    )
    report.write_text(json.dumps({"command": "robomosaic-demo " + " ".join(argv), **result}, indent=2) + "\n")
    print(summary_table(result))

    lo, hi = result["ci95"]
    print(
        f"\nrobomosaic demo done in {(time.time() - started) / 60:.1f} min\n"
        f"  demonstrations  {store_path}: {collected.store_episodes} episodes\n"
        f"  policy          {run / 'best'} ({trained['steps']} steps in {trained['seconds'] / 60:.1f} min)\n"
        f"  success         {result['success_rate']:.0%} ({result['successes']}/{cfg.eval_episodes} held-out "
        f"seeds), 95% CI [{lo:.2f}, {hi:.2f}]\n"
        f"  report          {report}\n"
        f"  videos          {', '.join(result['videos']) or '-'}"
    )


if __name__ == "__main__":
    main()
