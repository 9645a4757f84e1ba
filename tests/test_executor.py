"""The chunk executor: timing, late-action dropping, blending and safety holds."""

from __future__ import annotations

import time

import numpy as np
import pytest

from robomosaic.policies.executor import (
    ChunkExecutor,
    DelayedInference,
    ExecutorConfig,
    ThreadedInference,
    hold_zero_motion,
)

HZ = 20.0
DT = 1.0 / HZ


def timeline_predictor(horizon: int, n_obs_steps: int):
    """A policy whose action j is the time it is meant for (so a correct executor outputs `now`)."""
    calls = []

    def predict(history, committed):
        calls.append((history, committed))
        t_last = float(history["t"][-1, 0])
        j = np.arange(horizon)
        times = t_last + (j - (n_obs_steps - 1)) * DT
        return np.stack([times, np.ones(horizon)], axis=1)

    predict.calls = calls
    return predict


def run(executor: ChunkExecutor, steps: int, observe_until: int | None = None, obs_fn=None):
    out = []
    for k in range(steps):
        now = k * DT
        if observe_until is None or k < observe_until:
            obs = obs_fn(k, now) if obs_fn else {"t": np.array([now])}
            executor.observe(obs, now)
        out.append((now, *executor.act(now)))
    return out


@pytest.mark.parametrize("delay_steps", [0, 1, 3])
def test_actions_are_aligned_and_late_ones_dropped(delay_steps):
    horizon, n_obs = 16, 2
    predict = timeline_predictor(horizon, n_obs)
    cfg = ExecutorConfig(control_hz=HZ, n_obs_steps=n_obs, n_action_steps=8)
    ex = ChunkExecutor(DelayedInference(predict, delay=delay_steps * DT), cfg, action_dim=2)
    out = run(ex, 60)
    for k, (now, action, status) in enumerate(out):
        if k < delay_steps:
            assert status == "hold:no_chunk"
            continue
        assert status == "ok", (k, status)
        # The action executed at `now` is the one the policy meant for `now`, whatever the delay.
        assert action[0] == pytest.approx(now)
    # Each chunk loses the actions whose time passed during inference.
    assert ex.stats.dropped_actions == delay_steps * ex.stats.chunks
    assert ex.stats.held.get("no_chunk", 0) == delay_steps


def test_naive_switching_uses_newest_chunk():
    ids = iter(range(100))

    def predict(history, committed):
        return np.full((4, 1), float(next(ids)))

    cfg = ExecutorConfig(control_hz=HZ, n_obs_steps=1, n_action_steps=2)
    ex = ChunkExecutor(DelayedInference(predict), cfg, action_dim=1)
    values = [a[0] for _, a, _ in run(ex, 8)]
    assert values == [0, 0, 1, 1, 2, 2, 3, 3]


def test_temporal_ensembling_weights():
    ids = iter(range(100))

    def predict(history, committed):
        return np.full((3, 1), float(next(ids)))

    m = 0.5
    cfg = ExecutorConfig(control_hz=HZ, n_obs_steps=1, n_action_steps=1, blend="ensemble", ensemble_decay=m)
    ex = ChunkExecutor(DelayedInference(predict), cfg, action_dim=1)
    out = run(ex, 6)
    for k, (_, action, status) in enumerate(out):
        assert status == "ok"
        live = np.arange(max(0, k - 2), k + 1, dtype=float)  # chunks requested at k-2..k cover step k
        w = np.exp(-m * np.arange(len(live)))  # the oldest chunk has weight 1
        assert action[0] == pytest.approx(np.sum(w * live) / np.sum(w))


def test_stale_observations_hold_within_the_age_limit():
    predict = timeline_predictor(16, 1)
    cfg = ExecutorConfig(control_hz=HZ, n_obs_steps=1, n_action_steps=4, max_obs_age=2 * DT)

    def hold(last):
        return hold_zero_motion(last, 2, gripper_dims=(1,))

    ex = ChunkExecutor(DelayedInference(predict), cfg, action_dim=2, hold=hold)
    out = run(ex, 20, observe_until=10)
    statuses = [s for _, _, s in out]
    assert statuses[:12] == ["ok"] * 12  # the last observation (step 9) is at most 2 periods old
    assert all(s == "hold:stale_observation" for s in statuses[12:])
    assert ex.chunks == []  # a stale hold drops the old plan: it is never resumed
    held = out[15][1]
    assert held[0] == 0.0 and held[1] == 1.0  # no motion, gripper keeps its last command


def test_non_finite_observation_is_rejected():
    predict = timeline_predictor(8, 2)
    cfg = ExecutorConfig(control_hz=HZ, n_obs_steps=2, n_action_steps=1)
    ex = ChunkExecutor(DelayedInference(predict), cfg, action_dim=2)
    assert ex.observe({"t": np.array([0.0])}, 0.0)
    assert not ex.observe({"t": np.array([np.nan])}, DT)
    assert not ex.observe({"t": np.array([np.inf])}, DT)
    assert ex.stats.rejected_obs == 2
    _, status = ex.act(DT)
    assert status == "hold:nonfinite_observation"  # the newest observation is unusable: hold
    assert ex.observe({"t": np.array([2 * DT])}, 2 * DT)
    _, status = ex.act(2 * DT)
    assert status == "ok"
    history = predict.calls[-1][0]["t"][:, 0]
    assert np.all(np.isfinite(history)) and list(history) == [0.0, 2 * DT]


def test_rtc_commits_only_what_executes_before_the_next_chunk_arrives():
    horizon, n_obs = 8, 2
    predict = timeline_predictor(horizon, n_obs)
    cfg = ExecutorConfig(control_hz=HZ, n_obs_steps=n_obs, n_action_steps=3, blend="rtc")
    ex = ChunkExecutor(DelayedInference(predict, delay=2 * DT), cfg, action_dim=2)
    run(ex, 10)
    assert predict.calls[0][1] is None  # nothing is committed before the first chunk
    # Second request at 3 dt; its grid starts one step back (n_obs_steps = 2), at 2 dt. The chunk
    # arrives 2 dt later, at 5 dt, so the plan's actions for 2, 3 and 4 dt are committed.
    committed = predict.calls[1][1]
    np.testing.assert_allclose(committed[:3, 0], np.array([2, 3, 4]) * DT)
    assert np.all(np.isnan(committed[3:]))


def test_threaded_inference_never_blocks_and_misses_are_held():
    slow = {"on": False}

    def predict(history, committed):
        if slow["on"]:
            time.sleep(0.4)
        return np.zeros((4, 1))

    cfg = ExecutorConfig(control_hz=50.0, n_obs_steps=1, n_action_steps=2)
    ex = ChunkExecutor(ThreadedInference(predict), cfg, action_dim=1)
    t_start = time.monotonic()
    statuses, worst = [], 0.0
    for k in range(40):
        if k == 5:
            slow["on"] = True
        now = time.monotonic() - t_start
        ex.observe({"x": np.zeros(1)}, now)
        t0 = time.monotonic()
        _, status = ex.act(now)
        worst = max(worst, time.monotonic() - t0)
        statuses.append(status)
        time.sleep(max(0.0, (k + 1) / 50.0 - (time.monotonic() - t_start)))
    ex.close()
    assert worst < 0.05  # the control thread never waited for the 0.4 s inference
    assert "hold:no_chunk" in statuses  # the plan ran out while inference was late
    assert ex.stats.deadline_misses >= 1


def test_non_finite_chunk_is_never_executed():
    calls = iter(range(100))

    def predict(history, committed):
        k = next(calls)
        return np.full((4, 1), np.nan if k >= 1 else 0.5)

    cfg = ExecutorConfig(control_hz=HZ, n_obs_steps=1, n_action_steps=2)
    ex = ChunkExecutor(DelayedInference(predict), cfg, action_dim=1)
    out = run(ex, 8)
    assert [s for _, _, s in out[:4]] == ["ok"] * 4  # the first chunk covers 4 steps
    assert all(s == "hold:no_chunk" for _, _, s in out[4:])
    assert all(np.isfinite(a).all() for _, a, _ in out)
    assert ex.stats.rejected_chunks >= 2
