"""Reliability of the data layer (issue 18), on real zarr stores, real processes and real robosuite.

Several writers at once (collectors, plain appending processes, merges), a writer SIGKILLed while
holding the store's lock, a deleted, corrupted or garbled chunk / array metadata file, non-finite
or absurd values refused before training, the record node's seeds after a relaunch, and a write the
OS refuses (RLIMIT_FSIZE: the write fails with EFBIG as on a full disk).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from robomosaic.data.collect import main as collect
from robomosaic.data.multitask import merge_stores
from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.data.store import EpisodeStore, StoreError
from robomosaic.policies.train import main as train

BIN = Path(sys.executable).parent
COLLECT = BIN / "robomosaic-collect"
# Short failed lift episodes: real robosuite, a few seconds per collector.
SHORT = ["task=lift", "workers=1", "keep_failed=true", "task.max_steps=15"]
TINY_TRAIN = [
    "policy.unet.down_dims=[16,32]",
    "policy.unet.noise_embed_dim=16",
    "policy.encoder.state_feature_dim=16",
    "policy.encoder.state_hidden_dims=[32]",
    "train.batch_size=16",
    "train.steps=1",
    "train.eval_every=0",
    "val_ratio=0.34",
    "progress=false",
]


def checksum(path: Path) -> str:
    """sha256 over the relative path and bytes of every file under `path`."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def small_spec() -> DatasetSpec:
    return DatasetSpec(
        keys={"action": KeySpec((7,), "float32"), "state": KeySpec((5,), "float64")},
        control_hz=20.0,
        task="lift",
    )


def small_episode(seed: int, length: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "action": rng.uniform(-1, 1, (length, 7)).astype(np.float32),
        "state": rng.standard_normal((length, 5)),
    }


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    path = tmp_path / "small.zarr"
    store = EpisodeStore.create(path, small_spec())
    for seed in range(3):
        store.append_episode(small_episode(seed), {"seed": seed, "success": True})
    return path


# ---------------------------------------------------------------------- 1. concurrent writers


def _start_collector(out: Path, seed: int, episodes: int) -> subprocess.Popen:
    return subprocess.Popen(
        [str(COLLECT), *SHORT, f"episodes={episodes}", f"seed={seed}", f"out={out}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("existing", [False, True], ids=["new_store", "existing_store"])
def test_two_collectors_at_once_keep_every_episode(tmp_path, existing):
    out = tmp_path / "shared.zarr"
    before: list[int] = []
    if existing:
        collect([*SHORT, "episodes=1", "seed=50", f"out={out}"])
        before = [50]
    procs = [_start_collector(out, seed, 3) for seed in (0, 100)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
        assert "collected 3 episodes" in stdout, stdout
    store = EpisodeStore.open(out)
    seeds = sorted(int(s) for s in store.meta_array("seed"))
    assert seeds == sorted([*before, 0, 1, 2, 100, 101, 102]), seeds
    # The collector that finished last saw every episode in the store.
    held = [int(s.rsplit("holds ", 1)[1].split()[0]) for s, _ in results]
    assert max(held) == store.n_episodes == len(before) + 6, held


def _append_many(path: str, first_seed: int, n: int, barrier) -> None:
    store = EpisodeStore.open(path, mode="a")  # opened before anyone appends: a stale view
    barrier.wait()
    for seed in range(first_seed, first_seed + n):
        store.append_episode(small_episode(seed, length=3 + seed % 5), {"seed": seed, "success": True})


def test_concurrent_appending_processes_lose_nothing(small_store):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [
        ctx.Process(target=_append_many, args=(str(small_store), 100 * (i + 1), 8, barrier)) for i in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    store = EpisodeStore.open(small_store, in_memory=True)
    seeds = [int(s) for s in store.meta_array("seed")]
    want = [0, 1, 2, *(100 * (i + 1) + k for i in range(3) for k in range(8))]
    assert sorted(seeds) == sorted(want)
    for i, seed in enumerate(seeds):  # every episode holds its own data, none overwritten
        ep = store.episode(i)
        expected = small_episode(seed, length=6 if seed < 3 else 3 + seed % 5)
        for key, value in expected.items():
            np.testing.assert_array_equal(ep[key], value, err_msg=f"episode {i} seed {seed} {key}")


def _merge(inputs: list[str], out: str, barrier, results) -> None:
    barrier.wait()
    try:
        merge_stores(inputs, out, progress=False)
        results.put("ok")
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")


def test_two_merges_into_one_store_one_clear_refusal(tmp_path):
    inputs = []
    for task, dim in (("lift", 10), ("stack", 14)):
        spec = DatasetSpec(
            keys={"action": KeySpec((7,), "float32"), "object": KeySpec((dim,), "float64")},
            control_hz=20.0,
            task=task,
        )
        store = EpisodeStore.create(tmp_path / f"{task}.zarr", spec)
        for seed in range(2):
            rng = np.random.default_rng(seed)
            store.append_episode(
                {"action": rng.standard_normal((4, 7)), "object": rng.standard_normal((4, dim))},
                {"seed": seed, "success": True},
            )
        inputs.append(str(store.path))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    out = str(tmp_path / "multi.zarr")
    procs = [ctx.Process(target=_merge, args=(inputs, out, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    answers = sorted(results.get(timeout=5) for _ in procs)
    assert "ok" in answers, answers
    other = [a for a in answers if a != "ok"]
    assert all("already exists" in a for a in other), answers  # refused by name, nothing half merged
    assert EpisodeStore.open(out).n_episodes == 4


HOLDER = textwrap.dedent(
    """
    import sys, time
    from robomosaic.data.store import write_lock
    with write_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def test_lock_names_its_holder_and_a_sigkill_releases_it(small_store):
    from robomosaic.data.store import write_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(small_store)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError) as caught, write_lock(small_store, timeout=0.5):
            pass
        message = str(caught.value)
        assert str(small_store) in message and f"pid {holder.pid}" in message, message
        assert socket.gethostname() in message and "write_lock" in message, message  # host, command
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        store = EpisodeStore.open(small_store, mode="a")
        store.append_episode(small_episode(7), {"seed": 7, "success": True})
        assert time.monotonic() - started < 5.0
    finally:
        holder.kill()
        holder.wait()
    assert EpisodeStore.open(small_store).n_episodes == 4


# ---------------------------------------------------------------------- 2. damaged files


@pytest.mark.parametrize("key", ["action", "state"])
def test_missing_chunk_is_named_at_open(small_store, key):
    (small_store / "data" / key / "c" / "0" / "0").unlink()
    for kwargs in ({}, {"in_memory": True}):
        with pytest.raises(StoreError, match=rf"data/{key}.*chunk c/0/0 is missing.*episodes 0\.\.2"):
            EpisodeStore.open(small_store, **kwargs)


def test_garbage_chunk_is_named(small_store):
    (small_store / "data" / "action" / "c" / "0" / "0").write_bytes(b"not blosc at all" * 8)
    with pytest.raises(StoreError, match=r"data/action.*chunk c/0/0"):
        EpisodeStore.open(small_store, in_memory=True)
    store = EpisodeStore.open(small_store)  # on disk: only chunk existence is checked at open
    with pytest.raises(StoreError, match=r"data/action.*c/0/0"):
        store.read_frames("action", np.array([0, 1]))
    with pytest.raises(StoreError, match=r"data/action.*c/0/0"):
        store.episode(1)


def test_garbage_array_metadata_is_named(small_store):
    (small_store / "data" / "state" / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    with pytest.raises(StoreError, match=r"data/state/zarr\.json"):
        EpisodeStore.open(small_store)


# ---------------------------------------------------------------------- 2 + 3. refused by robomosaic-train


@pytest.fixture(scope="module")
def lift_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lift") / "lift.zarr"
    collect([*SHORT, "episodes=3", f"out={path}"])
    return path


def _damage(path: Path, fault: str) -> str:
    """Damage the store as `fault` says; the text the refusal must contain."""
    if fault == "missing_chunk":
        (path / "data" / "action" / "c" / "0" / "0").unlink()
        return "data/action.*chunk c/0/0 is missing"
    if fault == "garbage_chunk":
        (path / "data" / "robot0_eef_pos" / "c" / "0" / "0").write_bytes(os.urandom(300))
        return "data/robot0_eef_pos.*chunk c/0/0"
    if fault == "garbage_metadata":
        (path / "data" / "action" / "zarr.json").write_bytes(b"\x00garbage")
        return r"data/action/zarr\.json"
    value = {"nan": np.nan, "inf": np.inf, "huge": 1e30}[fault]
    key = "action" if fault != "inf" else "robot0_eef_pos"
    arr = zarr.open_array(path / "data" / key, mode="r+")
    ends = zarr.open_array(path / "meta" / "episode_ends")[:]
    arr[int(ends[0]) + 4, 1] = value  # episode 1, step 4
    what = "not finite" if fault != "huge" else r"above the limit 1e\+06"
    return rf"key '{key}'.*{what}.*episode 1 \(step 4"


FAULTS = ["missing_chunk", "garbage_chunk", "garbage_metadata", "nan", "inf", "huge"]


@pytest.mark.parametrize("fault", FAULTS)
def test_train_refuses_damaged_or_bad_data_before_any_step(lift_template, tmp_path, fault):
    path = tmp_path / "lift.zarr"
    shutil.copytree(lift_template, path)
    pattern = _damage(path, fault)
    before = checksum(path)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=pattern) as caught:
        train([f"dataset={path}", f"out={out}", *TINY_TRAIN])
    assert str(caught.value.code).startswith("robomosaic-train: "), caught.value.code
    assert not out.exists(), "nothing may be written before training starts"
    assert checksum(path) == before, "the store must be left unchanged"


def test_train_console_script_exits_nonzero_on_a_missing_chunk(lift_template, tmp_path):
    path = tmp_path / "lift.zarr"
    shutil.copytree(lift_template, path)
    pattern = _damage(path, "missing_chunk")
    before = checksum(path)
    done = subprocess.run(
        [str(BIN / "robomosaic-train"), f"dataset={path}", f"out={tmp_path / 'run'}", *TINY_TRAIN],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()
    assert checksum(path) == before
    debug = subprocess.run(
        [str(BIN / "robomosaic-train"), f"dataset={path}", f"out={tmp_path / 'run'}", *TINY_TRAIN, "--debug"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "StoreError" in debug.stderr, (
        debug.stderr
    )


def test_data_limit_is_configurable(lift_template, tmp_path):
    path = tmp_path / "lift.zarr"
    shutil.copytree(lift_template, path)
    with pytest.raises(SystemExit, match=r"key '\w+'.*above the limit 0\.5 in episode.*data_limit"):
        train([f"dataset={path}", f"out={tmp_path / 'run'}", *TINY_TRAIN, "data_limit=0.5"])


# ---------------------------------------------------------------------- 8. record node seeds


def test_record_node_never_repeats_a_seed_after_a_relaunch(tmp_path):
    from robomosaic.ros_nodes.record_node import reseed

    store = EpisodeStore.create(tmp_path / "teleop.zarr", small_spec())
    recorded: list[int] = []
    for _launch in range(3):  # every launch of the sim (seed:=0) resets to 1, 2, 3, ...
        store = EpisodeStore.open(tmp_path / "teleop.zarr", mode="a")  # the relaunched recorder
        sim_next = 1
        for _ in range(2):
            seed = sim_next
            restart = reseed(store, seed)
            if restart is not None:  # the recorder restarts the sim's seeds there and resets again
                seed = restart
                assert reseed(store, seed) is None
            sim_next = seed + 1
            store.append_episode(small_episode(seed), {"seed": seed, "success": True})
            recorded.append(seed)
    assert recorded == [1, 2, 3, 4, 5, 6]
    assert reseed(store, -1) is None  # no reset service: the seed is unknown, never "taken"


# ---------------------------------------------------------------------- 9. the OS refuses a write


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_refused_write_is_one_clear_line_and_the_store_stays_valid(tmp_path):
    out = tmp_path / "full.zarr"
    collect([*SHORT, "episodes=2", f"out={out}"])
    before = EpisodeStore.open(out, in_memory=True)
    largest = max(f.stat().st_size for f in out.rglob("*") if f.is_file())
    done = subprocess.run(
        [str(COLLECT), *SHORT, "episodes=2", f"out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(largest + 512),  # the next append grows the largest chunk past it
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},  # a .pyc cut short by the limit breaks imports
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert last.startswith("robomosaic-collect: ") and str(out) in last, last
    assert "File too large" in last, last
    store = EpisodeStore.open(out, mode="a")  # valid, with the episodes stored before
    assert store.n_episodes == 2
    for i in range(2):
        for key, value in before.episode(i).items():
            np.testing.assert_array_equal(store.episode(i)[key], value, err_msg=key)
    store.append_episode(store.episode(0), store.episode_meta(0))  # and it takes episodes again
