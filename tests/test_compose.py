"""robomosaic-compose end to end on the shipped GPC lift parents (tests/assets/gpc_lift): a tiny
weight search in real robosuite, the composed checkpoint it writes, and resuming a finished run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.composition import ComposedPolicy

ASSETS = Path(__file__).parent / "assets" / "gpc_lift"
PARENTS = [ASSETS / "unet", ASSETS / "transformer"]


def compose(out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        f"checkpoints=[{PARENTS[0]},{PARENTS[1]}]", f"out={out}", "grid_step=0.5", "selection_episodes=1",
        "report_episodes=1", "max_steps=12", "workers=1", "progress=false", *extra,
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "robomosaic.policies.compose", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_weight_search_writes_a_composed_checkpoint_and_resumes(tmp_path):
    run = compose(tmp_path / "ab")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "ab" / "compose.json").read_text())
    assert [p["weights"] for p in result["search"]] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert result["settings"]["selection"] == {"episodes": 1, "seed_offset": 500000}
    assert result["settings"]["report"] == {"episodes": 1, "seed_offset": 1000000}
    assert set(result["report"]) == {"composed", "gpc_lift/unet", "gpc_lift/transformer"}
    assert set(result["tests"]) == {"gpc_lift/unet", "gpc_lift/transformer"}
    assert (tmp_path / "ab" / "compose.png").stat().st_size > 10_000
    policy = load_policy(tmp_path / "ab" / "composed")
    assert isinstance(policy, ComposedPolicy) and policy.weights == result["chosen_weights"]
    # robomosaic-eval takes the composed checkpoint like any other
    report = tmp_path / "eval.json"
    evaluated = subprocess.run(
        [sys.executable, "-m", "robomosaic.policies.evaluate", f"checkpoint={tmp_path / 'ab' / 'composed'}",
         "episodes=1", "max_steps=12", "workers=1", "videos=0", "progress=false", f"out={report}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(report.read_text())["task"] == "lift", "the composed spec names its task"
    # a second run with the same command evaluates nothing again
    again = compose(tmp_path / "ab")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((tmp_path / "ab" / "compose.json").read_text())
    assert resumed["search"] == result["search"] and resumed["report"] == result["report"]
    # other settings in the same folder are refused, not mixed in
    other = compose(tmp_path / "ab", "selection_episodes=2")
    assert other.returncode != 0 and "other settings" in other.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("weights=[0.5,0.6]",), "must sum to 1"),
        (("weights=maybe",), "weights='maybe'"),
        (("selection_seed_offset=1000000",), "overlap"),
    ],
)
def test_bad_arguments_are_named(tmp_path, extra, message):
    run = compose(tmp_path / "x", *extra)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
