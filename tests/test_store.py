"""EpisodeStore on real zarr directories: round trip, validation, crash recovery (incl. SIGKILL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.data.store import EpisodeStore, StoreError


def make_spec(image: int = 8) -> DatasetSpec:
    return DatasetSpec(
        keys={
            "robot0_eef_pos": KeySpec((3,), "float32", "m", "robot base"),
            "action": KeySpec((7,), "float32", "normalized", "", "OSC_POSE delta"),
            "reward": KeySpec((), "float32"),
            "state": KeySpec((5,), "float64"),
            "agentview_image": KeySpec((image, image, 3), "uint8", "", "camera"),
        },
        control_hz=20.0,
        robot="Panda",
        controller="OSC_POSE",
        task="lift",
        extra={"note": "test"},
    )


def make_episode(spec: DatasetSpec, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for key, ks in spec.keys.items():
        if ks.is_image:
            out[key] = rng.integers(0, 256, (length, *ks.shape), dtype=np.uint8)
        else:
            out[key] = rng.standard_normal((length, *ks.shape)).astype(ks.dtype)
    return out


def meta(seed: int, **kw) -> dict:
    return {
        "seed": seed,
        "success": seed % 2 == 0,
        "task": "lift",
        "behaviour": f"b{seed}",
        "duration": 1.5,
        **kw,
    }


EPISODE_LENGTHS = [7, 3, 12]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "demo.zarr"
    spec = make_spec()
    store = EpisodeStore.create(path, spec)
    for seed, n in enumerate(EPISODE_LENGTHS):
        assert store.append_episode(make_episode(spec, n, seed), meta(seed)) == seed
    return path


@pytest.fixture
def filled(template: Path, tmp_path: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """A store of three episodes (a copy per test: tests damage it)."""
    path = tmp_path / "demo.zarr"
    shutil.copytree(template, path)
    return path, [make_episode(make_spec(), n, seed) for seed, n in enumerate(EPISODE_LENGTHS)]


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("in_memory", [False, True])
def test_round_trip(filled, in_memory):
    path, episodes = filled
    store = EpisodeStore.open(path, in_memory=in_memory)
    assert store.in_memory == in_memory
    assert store.spec.to_dict() == make_spec().to_dict()
    assert store.n_episodes == 3 and store.n_steps == 22
    assert store.episode_ends.tolist() == [7, 10, 22]
    assert store.episode_slice(1) == slice(7, 10)
    for i, ep in enumerate(episodes):
        got = store.episode(i)
        assert set(got) == set(ep)
        for key in ep:
            assert got[key].dtype == ep[key].dtype
            np.testing.assert_array_equal(got[key], ep[key])
        assert store.episode_meta(i) == meta(i)
    assert store.meta_array("success").tolist() == [True, False, True]
    np.testing.assert_array_equal(store.episode(-1, keys=["action"])["action"], episodes[2]["action"])
    with pytest.raises(IndexError, match="episode 3"):
        store.episode(3)


def test_root_attributes_describe_every_key(filled):
    path, _ = filled
    attrs = zarr.open_group(path, mode="r").attrs.asdict()
    assert attrs["spec"]["keys"]["robot0_eef_pos"] == {
        "shape": [3],
        "dtype": "float32",
        "units": "m",
        "frame": "robot base",
        "description": "",
    }
    assert attrs["spec"]["control_hz"] == 20.0 and attrs["spec"]["robot"] == "Panda"
    image = zarr.open_array(path / "data" / "agentview_image", mode="r")
    assert image.chunks[1:] == (8, 8, 3) and image.chunks[0] > 1
    assert "blosc" in str(image.metadata.codecs).lower()


def test_meta_defaults_and_casting(tmp_path):
    spec = make_spec()
    store = EpisodeStore.create(tmp_path / "s.zarr", spec)
    ep = make_episode(spec, 4, 0)
    ep["action"] = ep["action"].astype(np.float64)  # same kind: cast to the spec's float32
    store.append_episode(ep, {"success": True})
    assert store.episode_meta(0) == {
        "seed": -1,
        "success": True,
        "task": "lift",
        "behaviour": "",
        "duration": 0.2,
    }
    assert store.episode(0)["action"].dtype == np.float32


def test_create_refuses_existing_unless_overwrite(filled):
    path, _ = filled
    with pytest.raises(StoreError, match="already exists"):
        EpisodeStore.create(path, make_spec())
    assert EpisodeStore.create(path, make_spec(), overwrite=True).n_episodes == 0


def test_append_rejects_bad_episodes(tmp_path):
    spec = make_spec()
    store = EpisodeStore.create(tmp_path / "s.zarr", spec)
    good = make_episode(spec, 4, 0)
    cases = [
        ({k: v for k, v in good.items() if k != "reward"}, meta(0), "reward"),
        ({**good, "extra": good["reward"]}, meta(0), "extra"),
        ({**good, "state": good["state"][:, :4]}, meta(0), "'state' has shape"),
        ({**good, "agentview_image": good["agentview_image"].astype(np.float32)}, meta(0), "agentview_image"),
        ({**good, "reward": good["reward"][:3]}, meta(0), "different lengths"),
        ({k: v[:0] for k, v in good.items()}, meta(0), "at least one step"),
        (good, {"success": True, "sede": 1}, "sede"),
        (good, {"seed": 1}, "success"),
    ]
    for data, m, message in cases:
        with pytest.raises(StoreError, match=message) as info:
            store.append_episode(data, m)
        assert "episode 0" in str(info.value)
    assert store.n_episodes == 0
    reader = EpisodeStore.open(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="read only"):
        reader.append_episode(good, meta(0))


def test_open_or_create(tmp_path):
    path = tmp_path / "s.zarr"
    spec = make_spec()
    store = EpisodeStore.open_or_create(path, spec)
    store.append_episode(make_episode(spec, 5, 0), meta(0))
    again = EpisodeStore.open_or_create(path, make_spec())
    again.append_episode(make_episode(spec, 2, 1), meta(1))
    assert EpisodeStore.open(path).episode_ends.tolist() == [5, 7]
    with pytest.raises(StoreError, match="'agentview_image' differs"):
        EpisodeStore.open_or_create(path, make_spec(image=16))
    other = make_spec()
    other.keys["wrist_image"] = KeySpec((8, 8, 3), "uint8")
    with pytest.raises(StoreError, match="wrist_image"):
        EpisodeStore.open_or_create(path, other)
    other = make_spec()
    other.control_hz = 10.0
    with pytest.raises(StoreError, match="control_hz"):
        EpisodeStore.open_or_create(path, other)


def test_appends_are_incremental(tmp_path):
    """Appending writes the new chunks, it does not rewrite the arrays: old chunk files stay put."""
    spec = make_spec(image=32)
    store = EpisodeStore.create(tmp_path / "s.zarr", spec)
    for seed in range(10):
        store.append_episode(make_episode(spec, 30, seed), meta(seed))
    chunk_dir = tmp_path / "s.zarr" / "data" / "agentview_image" / "c"
    first = chunk_dir / "0" / "0" / "0" / "0"
    before = first.stat().st_mtime_ns, first.stat().st_ino
    store.append_episode(make_episode(spec, 30, 99), meta(99))
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == before
    n_chunks = -(-store.n_steps // store.array("agentview_image").chunks[0])
    assert n_chunks > 5 and len(list(chunk_dir.iterdir())) == n_chunks


# ---------------------------------------------------------------------- malformed stores


def _replace_array(path: Path, name: str, data: np.ndarray) -> None:
    group = zarr.open_group(path, mode="r+")
    del group[name]
    group.create_array(name, data=data)


def test_rejects_missing_key(filled):
    path, _ = filled
    shutil.rmtree(path / "data" / "state")
    with pytest.raises(StoreError, match="data/state") as info:
        EpisodeStore.open(path)
    assert str(path) in str(info.value)


def test_rejects_array_not_in_spec(filled):
    path, _ = filled
    zarr.open_group(path, mode="r+").create_array("data/ghost", data=np.zeros(22, np.float32))
    with pytest.raises(StoreError, match="ghost"):
        EpisodeStore.open(path)


def test_rejects_non_monotone_episode_ends(filled):
    path, _ = filled
    zarr.open_array(path / "meta" / "episode_ends", mode="r+")[:] = [7, 5, 22]
    with pytest.raises(StoreError, match="episode_ends is not increasing: episode 1 ends at 5, not after 7"):
        EpisodeStore.open(path)


def test_rejects_episode_ends_past_the_data(filled):
    path, _ = filled
    zarr.open_array(path / "meta" / "episode_ends", mode="r+")[:] = [7, 10, 30]
    with pytest.raises(StoreError, match=r"key '\w+' has 22 steps but the episodes need 30 \(episode 2"):
        EpisodeStore.open(path)


def test_rejects_short_data_array(filled):
    path, _ = filled
    zarr.open_array(path / "data" / "reward", mode="r+").resize((9,))
    with pytest.raises(StoreError, match=r"key 'reward' has 9 steps .*episode 1 is incomplete"):
        EpisodeStore.open(path)


def test_rejects_wrong_dtype(filled):
    path, _ = filled
    _replace_array(path, "data/state", np.zeros((22, 5), np.float32))
    with pytest.raises(StoreError, match="key 'state' has dtype float32, the spec says float64"):
        EpisodeStore.open(path)


def test_rejects_wrong_shape(filled):
    path, _ = filled
    _replace_array(path, "data/agentview_image", np.zeros((22, 8, 8, 4), np.uint8))
    with pytest.raises(StoreError, match="key 'agentview_image' has shape"):
        EpisodeStore.open(path)


def test_rejects_missing_episode_metadata(filled):
    path, _ = filled
    zarr.open_array(path / "meta" / "behaviour", mode="r+").resize((2,))
    with pytest.raises(StoreError, match="meta/behaviour.*episode 2"):
        EpisodeStore.open(path)


@pytest.mark.parametrize(
    ("spec_attr", "message"),
    [
        (None, "'spec' is missing"),
        ({"keys": {"a": {"shape": 3}}}, "'spec' is garbled"),
        ("nonsense", "garbled"),
    ],
)
def test_rejects_missing_or_garbled_spec(filled, spec_attr, message):
    path, _ = filled
    group = zarr.open_group(path, mode="r+")
    attrs = group.attrs.asdict()
    if spec_attr is None:
        del attrs["spec"]
    else:
        attrs["spec"] = spec_attr
    group.attrs.clear()
    group.attrs.update(attrs)
    with pytest.raises(StoreError, match=message):
        EpisodeStore.open(path)


def test_rejects_non_store(tmp_path):
    with pytest.raises(StoreError, match="no zarr.json"):
        EpisodeStore.open(tmp_path)
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(StoreError, match="not an episode store"):
        EpisodeStore.open(tmp_path / "plain.zarr")


# ---------------------------------------------------------------------- crash recovery


def test_tail_past_last_episode_is_ignored_then_truncated(filled):
    path, episodes = filled
    # An append that was killed after growing and writing two data arrays and one meta array.
    for name in ("data/action", "data/agentview_image", "meta/seed"):
        arr = zarr.open_array(path / name, mode="r+")
        arr.resize((arr.shape[0] + 4, *arr.shape[1:]))
    with pytest.warns(UserWarning, match="ignoring the tail"):
        reader = EpisodeStore.open(path, mode="r")
    assert reader.n_steps == 22
    assert zarr.open_array(path / "data/action").shape[0] == 26  # read mode leaves files alone
    with pytest.warns(UserWarning, match="truncating the tail"):
        writer = EpisodeStore.open(path, mode="a")
    assert zarr.open_array(path / "data/action").shape[0] == 22
    assert zarr.open_array(path / "meta/seed").shape[0] == 3
    spec = make_spec()
    new = make_episode(spec, 6, 42)
    writer.append_episode(new, meta(42))
    store = EpisodeStore.open(path)
    assert store.episode_ends.tolist() == [7, 10, 22, 28]
    for key in new:
        np.testing.assert_array_equal(store.episode(3)[key], new[key])
        np.testing.assert_array_equal(store.episode(2)[key], episodes[2][key])


def test_torn_episode_ends_entry_is_dropped(filled):
    """Killed between growing meta/episode_ends (zarr.json) and writing its chunk."""
    path, _ = filled
    spec = make_spec()
    # A full append whose last step, the episode_ends chunk, never happened:
    extra = make_episode(spec, 5, 7)
    for key, x in extra.items():
        arr = zarr.open_array(path / "data" / key, mode="r+")
        arr.append(x)
    for field in ("seed", "success", "task", "behaviour", "duration"):
        arr = zarr.open_array(path / "meta" / field, mode="r+")
        arr.resize((4,))
    ends = zarr.open_array(path / "meta" / "episode_ends", mode="r+")
    ends.resize((4,))
    assert ends[:].tolist() == [7, 10, 22, 0]
    with pytest.warns(UserWarning) as caught:
        store = EpisodeStore.open(path, mode="a")
    messages = [str(w.message) for w in caught]
    assert any("never written" in m and "dropping it" in m for m in messages), messages
    assert any("truncating the tail" in m for m in messages), messages
    assert store.n_episodes == 3
    store.append_episode(extra, meta(3))
    store = EpisodeStore.open(path)
    assert store.episode_ends.tolist() == [7, 10, 22, 27]
    np.testing.assert_array_equal(store.episode(3)["state"], extra["state"])


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from robomosaic.data.spec import DatasetSpec, KeySpec
    from robomosaic.data.store import EpisodeStore

    path, length = sys.argv[1], int(sys.argv[2])
    spec = DatasetSpec(
        keys={"action": KeySpec((7,), "float32"), "wrist_image": KeySpec((96, 96, 3), "uint8"),
              "agentview_image": KeySpec((96, 96, 3), "uint8")},
        control_hz=20.0,
    )
    store = EpisodeStore.open_or_create(path, spec)
    for k in range(store.n_episodes, 1000):
        rng = np.random.default_rng(k)
        data = {
            key: rng.integers(0, 256, (length, *ks.shape)).astype(ks.dtype) for key, ks in spec.keys.items()
        }
        print(f"appending {k}", flush=True)
        store.append_episode(data, {"seed": k, "success": True})
    """
)


def _expected_episode(k: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(k)
    shapes = {
        "action": ((7,), "float32"),
        "wrist_image": ((96, 96, 3), "uint8"),
        "agentview_image": ((96, 96, 3), "uint8"),
    }
    return {key: rng.integers(0, 256, (length, *s)).astype(d) for key, (s, d) in shapes.items()}


def _time_length(array_dir: Path) -> int:
    return json.loads((array_dir / "zarr.json").read_text())["shape"][0]


def _run_and_kill(path: Path, kill_in_episode: int, when: str, length: int) -> None:
    """Run the recorder and SIGKILL it while it appends episode `kill_in_episode`: right as the
    append starts (when="start"), or once the data arrays have begun to grow (when="data")."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(length)], stdout=subprocess.PIPE, text=True
    )
    try:
        for line in child.stdout:
            if line.strip() == f"appending {kill_in_episode}":
                if when == "data":
                    image = path / "data" / "agentview_image"
                    while _time_length(image) < (kill_in_episode + 1) * length:
                        time.sleep(0.001)
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def test_sigkill_while_appending_loses_only_the_episode_in_progress(tmp_path):
    path = tmp_path / "killed.zarr"
    length = 150  # 2 x 150 x 96x96x3 images: the data phase of an append takes 100s of ms
    saw_tail = False
    expected_episodes = 0
    for kill_in, when in [(1, "data"), (2, "start"), (3, "data")]:
        _run_and_kill(path, kill_in, when, length)
        ends = zarr.open_array(path / "meta" / "episode_ends", mode="r")[:]
        longest = max(
            zarr.open_array(path / "data" / k, mode="r").shape[0]
            for k in ("action", "wrist_image", "agentview_image")
        )
        saw_tail |= longest > (ends[-1] if len(ends) else 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            store = EpisodeStore.open(path, mode="r")
        damaged = longest > (ends[-1] if len(ends) else 0) or (len(ends) and ends[-1] == 0)
        assert bool(caught) == bool(damaged), [str(w.message) for w in caught]
        assert store.n_episodes == kill_in, "the killed episode must be lost, the earlier ones kept"
        for k in range(expected_episodes, kill_in):  # check episodes written since the last kill
            want = _expected_episode(k, length)
            got = store.episode(k)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"episode {k} key {key}")
            assert store.episode_meta(k)["seed"] == k
        expected_episodes = kill_in
        # The next run reopens in mode "a": it repairs the tail and goes on appending.
    assert saw_tail, "no kill landed while data was being written; make episodes bigger"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the last kill's tail, checked above
        store = EpisodeStore.open(path, mode="a")
    assert not list(path.rglob("*.partial"))
    for k in range(store.n_episodes):
        assert store.episode_slice(k).stop - store.episode_slice(k).start == length
