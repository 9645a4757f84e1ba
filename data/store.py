"""A zarr store of demonstration episodes, appended one episode at a time.

Layout (zarr format 3, one local directory)::

    <root>/zarr.json             attributes: format, version, spec (DatasetSpec.to_dict())
    <root>/data/<key>            (n_steps, *shape) episodes end to end along time, time-chunked, Blosc
    <root>/meta/episode_ends     (n_episodes,) int64, exclusive end of every episode along time
    <root>/meta/<field>          (n_episodes,) seed, success, task, behaviour, duration

Crash safety. zarr's LocalStore writes every file (an array's ``zarr.json`` or one chunk) into a
temporary ``*.partial`` file and renames it over the target, so a killed process leaves each file
either old or new, never half written. Growing an array is two such writes: ``zarr.json`` with the
new shape first, then the chunks. An append therefore writes the data arrays, then the per-episode
meta arrays, and ``meta/episode_ends`` last: until its new entry is in place, the episode does not
exist and readers see extra steps past the last episode end (a tail), which `open` drops with a
warning. The one torn state of ``episode_ends`` itself is "shape grown, chunk not yet written"; the
new entry then reads as the fill value 0, which no real episode end can be (episodes have at least one
step), so `open` recognises and drops it. To keep that true, entries are zeroed before the array is
ever shrunk, so stale values never reappear past the shape. zarr does not fsync: this protects against
a killed process, not against losing power.

Several writers. Appends (and the crash repair of `open(mode="a")`) hold an inter-process lock,
`flock` on ``<root>/.lock``: a collector, a record node and a merge may append to one store at once,
and each append re-reads the episode index under the lock, so none overwrites another's episode. The
lock file names its holder (pid, host, command) for the error of a writer that waited too long. A
killed holder releases the lock with its file descriptor. `create` builds the store in a temporary
sibling directory and renames it into place, so of two processes creating one store, one wins and
the other sees "already exists". flock is local to one machine: do not share a store over NFS.

Damaged files. Every chunk is written, even one holding only the fill value, so `open` can check
that every chunk the episodes need exists (zarr would read a deleted chunk as zeros); an unreadable
chunk or array ``zarr.json`` raises a `StoreError` naming the file. `check_values` refuses non-finite
or absurdly large values before training.
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import os
import shutil
import socket
import sys
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.sync import sync

from robomosaic.conf.console import RobomosaicError
from robomosaic.data.spec import DatasetSpec, KeySpec

FORMAT = "robomosaic.episode_store"
FORMAT_VERSION = 1

# Per-episode metadata: field -> dtype. Fields missing from `append_episode(meta=...)` get defaults
# (`_meta_defaults`), except `success`, which a recorder must always state.
META_FIELDS: dict[str, str] = {
    "seed": "int64",
    "success": "bool",
    "task": "str",
    "behaviour": "str",
    "duration": "float64",
}

# Time-chunk sizes. Images (uint8 HWC) get small chunks because training reads a couple of frames at
# random times and a whole chunk is decompressed per read; per-chunk costs (a file, a zarr codec
# call) dominate below ~100 kB, so 128 kB (6 frames of 84x84x3) was the fastest both to append
# and to read random windows from (measured: 180 ms CPU per 150-step two-camera episode, against
# 280 ms with 64 kB and 150 ms with 256 kB chunks, whose window reads were 10-15% slower). Low
# dimensional keys are tiny per step, so chunks of ~1 MB keep the file count low and a whole array
# usually fits in a few chunks (diffusion_policy's ReplayBuffer uses ~2 MB time chunks the same way).
IMAGE_CHUNK_BYTES = 1 << 17
LOWDIM_CHUNK_BYTES = 1 << 20
META_CHUNK = 4096
DEFAULT_CACHE_BYTES = 256 << 20
LOCK_FILE = ".lock"
# An append holds the lock for milliseconds, a merge or a repair for longer: wait rather than fail.
DEFAULT_LOCK_TIMEOUT = 120.0
# Every chunk is written (see the module docstring); zarr's arrays take this config when opened.
WRITE_EVERY_CHUNK = {"array.write_empty_chunks": True}


class StoreError(RobomosaicError, ValueError):
    """A store that cannot be opened or written as asked; the message names path, key and episode."""


def time_chunk(key_spec: KeySpec) -> int:
    """Number of time steps per chunk for a key."""
    step_bytes = np.dtype(key_spec.dtype).itemsize * math.prod(key_spec.shape)
    target = IMAGE_CHUNK_BYTES if key_spec.is_image else LOWDIM_CHUNK_BYTES
    return max(1, target // max(1, step_bytes))


def _compressor(dtype: str) -> BloscCodec:
    # lz4 decompresses fastest; byte shuffle helps multi-byte numbers and is useless for uint8/bool.
    shuffle = "shuffle" if np.dtype(dtype).itemsize > 1 else "noshuffle"
    return BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)


class EpisodeStore:
    """Episodes of time-stepped arrays in one zarr directory (see the module docstring).

    Create with `create`, read or append with `open`, or `open_or_create`. With ``in_memory=True``
    every array is loaded into numpy at open (read only), which is what training wants.
    """

    def __init__(
        self,
        path: Path,
        spec: DatasetSpec,
        mode: str,
        root: zarr.Group | None,
        data: dict[str, Any],
        meta: dict[str, Any],
        episode_ends: np.ndarray,
        cache_bytes: int = 0,
    ) -> None:
        self.path = path
        self.spec = spec
        self.mode = mode
        self._root = root
        self._data = data
        self._meta = meta
        self._ends = episode_ends
        self._reader = _ChunkReader(path, cache_bytes, episode_ends)

    # ------------------------------------------------------------------ creation / opening

    @classmethod
    def create(cls, path: str | Path, spec: DatasetSpec, overwrite: bool = False) -> EpisodeStore:
        """Create an empty store at `path` (a directory); refuse to replace one unless `overwrite`."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise StoreError(f"{path}: already exists (open it, or pass overwrite=True to replace it)")
        if not spec.keys:
            raise StoreError(f"{path}: the spec has no keys")
        for key in spec.keys:
            if not key or "/" in key or key.startswith("."):
                raise StoreError(f"{path}: key {key!r} is not a valid array name")
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            _write_empty_store(tmp, spec)
            if overwrite and path.exists():
                shutil.rmtree(path)
            os.rename(tmp, path)  # atomic; fails if another process created `path` meanwhile
        except OSError as e:
            if path.exists():
                raise StoreError(f"{path}: already exists (created by another process meanwhile)") from None
            raise StoreError(f"{path}: cannot create the store: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path, mode="a")

    @classmethod
    def open(
        cls,
        path: str | Path,
        mode: str = "r",
        in_memory: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> EpisodeStore:
        """Open and validate a store. mode "r" reads, "a" also appends (and repairs a crash tail).

        `cache_bytes` bounds the decompressed chunks `read_frames` keeps (on disk only).
        """
        path = Path(path)
        if mode not in ("r", "a"):
            raise StoreError(f"{path}: mode must be 'r' or 'a', got {mode!r}")
        if in_memory and mode != "r":
            raise StoreError(f"{path}: an in-memory store is read only; open it with mode='r'")
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a zarr store (no zarr.json)")
        if mode == "a":
            with write_lock(path):  # the repair must not truncate another writer's append
                root, spec, data, meta, ends = _open_and_validate(path, repair=True)
                for partial in path.rglob("*.partial"):  # temp files of writes that a kill interrupted
                    partial.unlink(missing_ok=True)
        else:
            root, spec, data, meta, ends = _open_and_validate(path, repair=False)
        n = int(ends[-1]) if len(ends) else 0
        reader = _ChunkReader(path, 0, ends)
        for key, arr in data.items():
            reader.check_chunks_exist(key, arr)
        store = cls(path, spec, mode, root, data, meta, ends, cache_bytes)
        if in_memory:
            store._data = {k: reader.read_range(k, a, 0, n) for k, a in data.items()}
            store._meta = {k: _read_whole(path, f"meta/{k}", a, 0, len(ends)) for k, a in meta.items()}
            store._root = None
        return store

    @classmethod
    def open_or_create(cls, path: str | Path, spec: DatasetSpec) -> EpisodeStore:
        """Open `path` for appending if it exists (its schema must equal `spec`), else create it."""
        path = Path(path)
        if not path.exists():
            try:
                return cls.create(path, spec)
            except StoreError:
                if not path.exists():
                    raise  # otherwise another process created it meanwhile: append to that one
        store = cls.open(path, mode="a")
        _check_same_schema(path, store.spec, spec)
        return store

    # ------------------------------------------------------------------ reading

    @property
    def episode_ends(self) -> np.ndarray:
        """Exclusive end index of every episode along time (a copy)."""
        return self._ends.copy()

    @property
    def n_episodes(self) -> int:
        return len(self._ends)

    @property
    def n_steps(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def in_memory(self) -> bool:
        return self._root is None

    def episode_slice(self, i: int) -> slice:
        i = self._episode_index(i)
        start = int(self._ends[i - 1]) if i > 0 else 0
        return slice(start, int(self._ends[i]))

    def episode(self, i: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """All steps of episode `i` for `keys` (default: every key)."""
        sl = self.episode_slice(i)
        if self.in_memory:
            return {k: self._data[k][sl] for k in self._keys(keys)}
        return {k: self._reader.read_range(k, self._data[k], sl.start, sl.stop) for k in self._keys(keys)}

    def episode_meta(self, i: int) -> dict[str, Any]:
        i = self._episode_index(i)
        out = {}
        for field in META_FIELDS:
            value = np.asarray(self._meta[field][i : i + 1])[0]
            out[field] = value.item() if isinstance(value, np.generic) else value
        return out

    def array(self, key: str) -> Any:
        """The whole array of `key` (zarr array on disk, numpy in memory). Its length may exceed
        `n_steps` by an uncommitted tail in read mode; index it with episode slices."""
        if key not in self._data:
            raise StoreError(f"{self.path}: no key {key!r} (keys: {sorted(self._data)})")
        return self._data[key]

    def read_frames(self, key: str, frames: np.ndarray) -> np.ndarray:
        """Rows `frames` (global time indices, any order and shape) of `key`: (*frames.shape, *shape).

        On disk every chunk is read and decompressed once however many frames of it are asked
        for, and kept in a per-process cache of `cache_bytes` (see `_ChunkReader`).
        """
        arr = self.array(key)
        frames = np.asarray(frames, dtype=np.int64)
        if isinstance(arr, np.ndarray):
            return arr[frames]
        if frames.size and (frames.min() < 0 or frames.max() >= self.n_steps):
            raise IndexError(f"{self.path}: key {key!r}: frames outside [0, {self.n_steps})")
        return self._reader.read(key, arr, frames)

    def meta_array(self, field: str) -> np.ndarray:
        """One per-episode metadata field for every episode."""
        if field not in META_FIELDS:
            raise StoreError(f"{self.path}: no metadata field {field!r} (fields: {list(META_FIELDS)})")
        return np.asarray(self._meta[field][: self.n_episodes])

    # ------------------------------------------------------------------ appending

    def append_episode(self, data: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> int:
        """Append one episode atomically and return its index (see the module docstring)."""
        if self.mode != "a" or self._root is None:
            raise StoreError(f"{self.path}: opened read only; open with mode='a' to append")
        with write_lock(self.path):
            # Another process may have appended since this one opened the store: re-read it.
            self._root, _, self._data, self._meta, self._ends = _open_and_validate(self.path, repair=True)
            self._reader.clear(self._ends)
            return self._append_locked(data, meta)

    def check_values(self, limit: float) -> dict[str, tuple[float, float]]:
        """Refuse non-finite values and values beyond +-`limit` in any floating key, naming the key,
        episode, step and dimension; return every floating key's (min, max) over all episodes."""
        ranges = {}
        for key, ks in self.spec.keys.items():
            if np.dtype(ks.dtype).kind != "f" or not self.n_steps:
                continue
            lo, hi = np.inf, -np.inf
            for start in range(0, self.n_steps, 1 << 16):
                x = self.read_frames(key, np.arange(start, min(self.n_steps, start + (1 << 16))))
                x = x.reshape(len(x), -1)
                for bad, what, hint in (
                    (~np.isfinite(x), "not finite", "fix or drop the episode"),
                    (np.abs(x) > limit, f"above the limit {limit:g}", "raise data_limit=... if it is real"),
                ):
                    if bad.any():
                        step, dim = (int(v[0]) for v in np.nonzero(bad))
                        frame = start + step
                        episode = int(np.searchsorted(self._ends, frame, side="right"))
                        raise StoreError(
                            f"{self.path}: key {key!r}: value {x[step, dim]:g} {what} in episode {episode} "
                            f"(step {frame - self.episode_slice(episode).start}, dimension {dim}); {hint}"
                        )
                lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
            ranges[key] = (lo, hi)
        return ranges

    def _append_locked(self, data: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> int:
        episode = self.n_episodes
        arrays = self._check_episode_data(data, episode)
        length = len(next(iter(arrays.values())))
        values = self._check_episode_meta(meta, episode, length)
        start = self.n_steps
        data_writes = [(self._data[k], start, x) for k, x in arrays.items()]
        meta_writes = [
            (self._meta[f], episode, np.array([v], self._meta[f].dtype)) for f, v in values.items()
        ]
        ends_write = [(self._meta_ends(), episode, np.array([start + length], np.int64))]
        # Three phases in this order; within a phase the arrays are written concurrently.
        try:
            for writes in (data_writes, meta_writes, ends_write):  # ends last: the commit point
                sync(_grow_and_write_all(writes))
        except OSError as e:  # a full disk, a file size limit: the committed episodes stay valid
            raise StoreError(
                f"{self.path}: episode {episode} NOT stored: {e.strerror or e} ({e.filename or 'write'}); "
                f"the store still holds its {episode} earlier episodes"
            ) from e
        self._ends = np.append(self._ends, np.int64(start + length))
        self._reader.clear(self._ends)
        return episode

    def _check_episode_data(self, data: Mapping[str, np.ndarray], episode: int) -> dict[str, np.ndarray]:
        where = f"{self.path}: episode {episode}"
        missing = sorted(set(self.spec.keys) - set(data))
        extra = sorted(set(data) - set(self.spec.keys))
        if missing or extra:
            raise StoreError(f"{where}: keys missing {missing}, not in the spec {extra}")
        arrays, lengths = {}, {}
        for key, ks in self.spec.keys.items():
            x = np.asarray(data[key])
            if x.shape[1:] != ks.shape or x.ndim != len(ks.shape) + 1:
                raise StoreError(
                    f"{where}: key {key!r} has shape {x.shape}, expected (T, {', '.join(map(str, ks.shape))})"
                )
            if not np.can_cast(x.dtype, ks.dtype, casting="same_kind"):
                raise StoreError(f"{where}: key {key!r} has dtype {x.dtype}, expected {ks.dtype}")
            arrays[key] = np.ascontiguousarray(x, dtype=ks.dtype)
            lengths[key] = len(x)
        if len(set(lengths.values())) != 1:
            raise StoreError(f"{where}: keys have different lengths {lengths}")
        if next(iter(lengths.values())) == 0:
            raise StoreError(f"{where}: an episode needs at least one step")
        return arrays

    def _check_episode_meta(self, meta: Mapping[str, Any], episode: int, length: int) -> dict[str, Any]:
        where = f"{self.path}: episode {episode}"
        unknown = sorted(set(meta) - set(META_FIELDS))
        if unknown:
            raise StoreError(f"{where}: unknown metadata fields {unknown} (known: {list(META_FIELDS)})")
        if "success" not in meta:
            raise StoreError(f"{where}: metadata field 'success' is required")
        defaults = {
            "seed": -1,
            "task": self.spec.task,
            "behaviour": "",
            "duration": length / self.spec.control_hz if self.spec.control_hz else 0.0,
        }
        values = {**defaults, **meta}
        try:
            return {
                "seed": int(values["seed"]),
                "success": bool(values["success"]),
                "task": str(values["task"]),
                "behaviour": str(values["behaviour"]),
                "duration": float(values["duration"]),
            }
        except (TypeError, ValueError) as e:
            raise StoreError(f"{where}: bad metadata value: {e}") from e

    # ------------------------------------------------------------------ helpers

    def _meta_ends(self) -> zarr.Array:
        return self._root["meta/episode_ends"]

    def _keys(self, keys: Sequence[str] | None) -> list[str]:
        keys = list(self.spec.keys) if keys is None else list(keys)
        for k in keys:
            if k not in self._data:
                raise StoreError(f"{self.path}: no key {k!r} (keys: {sorted(self._data)})")
        return keys

    def _episode_index(self, i: int) -> int:
        n = self.n_episodes
        if not -n <= i < n:
            raise IndexError(f"{self.path}: episode {i} out of range (store has {n} episodes)")
        return i % n

    def __len__(self) -> int:
        return self.n_episodes

    def __repr__(self) -> str:
        where = "memory" if self.in_memory else "disk"
        return f"EpisodeStore({str(self.path)!r}, {self.n_episodes} episodes, {self.n_steps} steps, {where})"

    # Data-loader workers get a copy of the dataset: an on-disk store reopens by path (zarr handles
    # hold an event loop), an in-memory one travels as its numpy arrays.
    def __getstate__(self) -> dict[str, Any]:
        if self.in_memory:
            return dict(self.__dict__)
        return {"path": self.path, "cache_bytes": self._reader.capacity, "reopen": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("reopen"):
            state = dict(EpisodeStore.open(state["path"], "r", cache_bytes=state["cache_bytes"]).__dict__)
        self.__dict__.update(state)


@contextmanager
def write_lock(path: str | Path, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the inter-process write lock of the store at `path` (see the module docstring).

    Waits up to `timeout` seconds, then raises a StoreError naming the holder.
    """
    path = Path(path)
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreError(f"{path}: cannot open the write lock {LOCK_FILE}: {e.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                    raise StoreError(
                        f"{path}: another writer has held the store's lock for over {timeout:g} s "
                        f"({holder}); wait for it or stop it"
                    ) from None
                time.sleep(0.01)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _holder_text() -> str:
    try:  # the whole command line, `python -c <script>` included (sys.argv drops the script)
        command = Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        command = " ".join(sys.argv)
    return f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(command.split())[:300]}"


def _write_empty_store(path: Path, spec: DatasetSpec) -> None:
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.attrs.update({"format": FORMAT, "version": FORMAT_VERSION, "spec": spec.to_dict()})
    data_group = root.create_group("data")
    for key, ks in spec.keys.items():
        data_group.create_array(
            key,
            shape=(0, *ks.shape),
            chunks=(time_chunk(ks), *ks.shape),
            dtype=ks.dtype,
            compressors=[_compressor(ks.dtype)],
            fill_value=0,
        )
    meta_group = root.create_group("meta")
    meta_group.create_array("episode_ends", shape=(0,), chunks=(META_CHUNK,), dtype="int64", fill_value=0)
    for field, dtype in META_FIELDS.items():
        meta_group.create_array(field, shape=(0,), chunks=(META_CHUNK,), dtype=dtype)


def _open_and_validate(
    path: Path, repair: bool
) -> tuple[zarr.Group, DatasetSpec, dict[str, zarr.Array], dict[str, zarr.Array], np.ndarray]:
    with zarr.config.set(WRITE_EVERY_CHUNK):  # arrays take the config when they are opened
        try:
            root = zarr.open_group(path, mode="r+" if repair else "r", zarr_format=3)
        except Exception as e:  # zarr raises several types for a broken hierarchy
            raise StoreError(f"{path}: cannot open as a zarr group: {e}") from e
        spec = _read_spec(path, root)
        data, meta, ends = _validate(path, root, spec, repair=repair)
    return root, spec, data, meta, ends


def _read_whole(path: Path, name: str, arr: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Entries [start, stop) of an array read through zarr, any damage named."""
    try:
        return arr[start:stop]
    except Exception as e:  # Blosc, JSON or codec errors: zarr raises many types
        raise StoreError(
            f"{path}: {name} is unreadable ({type(e).__name__}: {e}); the store is damaged"
        ) from e


async def _grow_and_write_all(writes: list[tuple[zarr.Array, int, np.ndarray]]) -> None:
    """For every (arr, at, x): grow `arr` along time to `at + len(x)` (its zarr.json first), then
    write `x` there (its chunks). The arrays are written concurrently with zarr's async API: one by
    one, each costs a few file writes and renames in sequence."""

    async def grow_and_write(arr: zarr.Array, at: int, x: np.ndarray) -> None:
        await arr.async_array.resize((at + len(x), *arr.shape[1:]))
        await arr.async_array.setitem(slice(at, at + len(x)), x)

    # Let every write finish before raising one's error: a write left pending would keep running
    # (or be reported as destroyed at exit) after the caller has given up on this append.
    results = await asyncio.gather(*(grow_and_write(*w) for w in writes), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class _ChunkReader:
    """Reads rows of on-disk arrays chunk by chunk, with an LRU cache of decompressed chunks.

    Written by hand rather than calling zarr's `get_orthogonal_selection` because zarr 3 spends about
    1 ms of CPU per chunk in its async codec pipeline, ten times what reading the chunk file and
    calling numcodecs' Blosc directly costs; random training windows touch hundreds of chunks per
    batch. The direct path applies only to arrays this module creates (regular chunk grid, codecs
    `bytes` + `blosc`, default chunk keys); anything else goes through zarr.
    """

    def __init__(self, root: Path, capacity: int, ends: np.ndarray) -> None:
        self.root = root
        self.capacity = capacity
        self.ends = ends  # the store's episode ends, to name the episodes a damaged chunk holds
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._size = 0
        self._layouts: dict[str, _ChunkLayout | None] = {}

    def clear(self, ends: np.ndarray) -> None:
        self.ends = ends
        self._cache.clear()
        self._size = 0

    def read(self, key: str, arr: zarr.Array, frames: np.ndarray) -> np.ndarray:
        layout = self._layout(key, arr)
        if layout is None:
            unique, inverse = np.unique(frames, return_inverse=True)
            try:
                return arr.get_orthogonal_selection((unique,))[inverse.reshape(frames.shape)]
            except Exception as e:  # zarr raises many types for damaged chunks
                raise StoreError(f"{self.root}: data/{key} is unreadable ({type(e).__name__}: {e})") from e
        flat = frames.reshape(-1)
        size = layout.shape[0]
        out = np.empty((len(flat), *layout.shape[1:]), dtype=layout.dtype)
        chunk_of = flat // size
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        for rows in np.split(order, bounds):
            if len(rows) == 0:
                continue
            c = int(chunk_of[rows[0]])
            out[rows] = self._chunk(key, layout, c)[flat[rows] - c * size]
        return out.reshape(*frames.shape, *layout.shape[1:])

    def read_range(self, key: str, arr: zarr.Array, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of `key`, chunk by chunk, without caching them (a whole episode or
        store is read once)."""
        layout = self._layout(key, arr)
        if layout is None:
            return _read_whole(self.root, f"data/{key}", arr, start, stop)
        size = layout.shape[0]
        out = np.empty((stop - start, *layout.shape[1:]), dtype=layout.dtype)
        for c in range(start // size, -(-stop // size)):
            lo, hi = max(start, c * size), min(stop, (c + 1) * size)
            cached = self._cache.get((key, c))
            chunk = cached if cached is not None else self._decode(key, layout, c)
            out[lo - start : hi - start] = chunk[lo - c * size : hi - c * size]
        return out

    def check_chunks_exist(self, key: str, arr: zarr.Array) -> None:
        """Raise a StoreError naming the first chunk file of `key` that the episodes need and that
        is missing (zarr would read it as zeros)."""
        layout = self._layout(key, arr)
        n_steps = int(self.ends[-1]) if len(self.ends) else 0
        if layout is None or not n_steps:
            return
        for c in range(-(-n_steps // layout.shape[0])):
            if not os.path.exists(layout.file(c)):
                raise StoreError(self._damage(key, layout, c, "is missing"))

    def _layout(self, key: str, arr: zarr.Array) -> _ChunkLayout | None:
        if key not in self._layouts:
            self._layouts[key] = _ChunkLayout.of(self.root / "data" / key, arr)
        return self._layouts[key]

    def _damage(self, key: str, layout: _ChunkLayout, c: int, what: str) -> str:
        size, ends = layout.shape[0], self.ends
        last_step = min((c + 1) * size, int(ends[-1]) if len(ends) else 0) - 1
        where = f"steps {c * size}..{last_step}"
        if last_step >= c * size:
            first = int(np.searchsorted(ends, c * size, side="right"))
            where += f", episodes {first}..{int(np.searchsorted(ends, last_step, side='right'))}"
        return (
            f"{self.root}: data/{key}: chunk {layout.name(c)} {what} ({where}); the store is damaged: "
            "restore the file from a copy or drop those episodes"
        )

    def _chunk(self, key: str, layout: _ChunkLayout, c: int) -> np.ndarray:
        cached = self._cache.get((key, c))
        if cached is not None:
            self._cache.move_to_end((key, c))
            return cached
        chunk = self._decode(key, layout, c)
        if chunk.nbytes <= self.capacity:
            self._cache[(key, c)] = chunk
            self._size += chunk.nbytes
            while self._size > self.capacity:
                self._size -= self._cache.popitem(last=False)[1].nbytes
        return chunk

    def _decode(self, key: str, layout: _ChunkLayout, c: int) -> np.ndarray:
        try:
            with open(layout.file(c), "rb") as f:
                raw = blosc.decompress(f.read())
            return np.frombuffer(raw, dtype=layout.dtype).reshape(layout.shape)
        except FileNotFoundError:
            raise StoreError(self._damage(key, layout, c, "is missing")) from None
        except (RuntimeError, ValueError) as e:  # Blosc refuses the bytes, or they decode to the wrong size
            raise StoreError(self._damage(key, layout, c, f"is unreadable ({e})")) from None


@dataclass(frozen=True)
class _ChunkLayout:
    """Where the chunk files of an array are and how to decode them (computed once per key: zarr's
    metadata properties and pathlib cost more than reading a small chunk)."""

    prefix: str  # chunk file of time chunk c: f"{prefix}{c}{suffix}"
    suffix: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any

    def file(self, c: int) -> str:
        return f"{self.prefix}{c}{self.suffix}"

    def name(self, c: int) -> str:
        """The chunk's path inside its array's folder, e.g. c/3/0."""
        return f"c{self.file(c)[len(self.prefix) - 1 :]}"

    @classmethod
    def of(cls, directory: Path, arr: zarr.Array) -> _ChunkLayout | None:
        """The layout, or None for arrays this module did not create (read those through zarr)."""
        meta = arr.metadata
        codecs = meta.codecs
        if not (
            isinstance(meta.chunk_grid, RegularChunkGrid)
            and len(codecs) == 2
            and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == "little")
            and isinstance(codecs[1], BloscCodec)
            and meta.chunk_key_encoding.name == "default"
            and arr.chunks[1:] == arr.shape[1:]
        ):
            return None
        sep = meta.chunk_key_encoding.separator
        return cls(
            prefix=f"{directory}/c{sep}",
            suffix=f"{sep}0" * (arr.ndim - 1),
            shape=tuple(arr.chunks),
            dtype=arr.dtype.newbyteorder("<"),  # the bytes codec writes little endian
            fill_value=meta.fill_value,
        )


def _read_spec(path: Path, root: zarr.Group) -> DatasetSpec:
    attrs = root.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: not an episode store (root attribute 'format' is {attrs.get('format')!r})")
    if attrs.get("version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store version {attrs.get('version')!r}, this code reads {FORMAT_VERSION}")
    if "spec" not in attrs:
        raise StoreError(f"{path}: root attribute 'spec' is missing")
    try:
        spec = DatasetSpec.from_dict(attrs["spec"])
    except Exception as e:
        raise StoreError(f"{path}: root attribute 'spec' is garbled: {e!r}") from e
    if not spec.keys:
        raise StoreError(f"{path}: root attribute 'spec' describes no keys")
    return spec


def _member(path: Path, root: zarr.Group, name: str) -> zarr.Array:
    try:
        node = root[name]
    except KeyError:
        raise StoreError(f"{path}: missing array {name!r}") from None
    except Exception as e:  # a garbled zarr.json: JSON, Unicode or metadata errors
        raise StoreError(f"{path}: {name}/zarr.json is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{path}: {name!r} is not an array")
    return node


def _validate(
    path: Path, root: zarr.Group, spec: DatasetSpec, repair: bool
) -> tuple[dict[str, zarr.Array], dict[str, zarr.Array], np.ndarray]:
    """Check arrays against the spec and each other; drop (repair=True: delete) a crash tail."""
    data: dict[str, zarr.Array] = {}
    for key, ks in spec.keys.items():
        arr = _member(path, root, f"data/{key}")
        if arr.dtype != np.dtype(ks.dtype):
            raise StoreError(f"{path}: key {key!r} has dtype {arr.dtype}, the spec says {ks.dtype}")
        if tuple(arr.shape[1:]) != ks.shape or arr.ndim != len(ks.shape) + 1:
            raise StoreError(
                f"{path}: key {key!r} has shape {tuple(arr.shape)}, the spec says (T, {ks.shape}) per step"
            )
        data[key] = arr
    extra = sorted(set(root["data"].array_keys()) - set(spec.keys)) if "data" in root else []
    if extra:
        raise StoreError(f"{path}: data arrays {extra} are not described in the spec attribute")

    ends_arr = _member(path, root, "meta/episode_ends")
    if ends_arr.ndim != 1 or ends_arr.dtype.kind not in "iu":
        raise StoreError(
            f"{path}: 'meta/episode_ends' must be 1-D integers, is {ends_arr.dtype}{ends_arr.shape}"
        )
    per_chunk = ends_arr.chunks[0]
    for c in range(-(-ends_arr.shape[0] // per_chunk)):
        torn = c * per_chunk == ends_arr.shape[0] - 1  # only the torn last entry: it reads as 0
        if not torn and not (path / "meta" / "episode_ends" / "c" / str(c)).is_file():
            raise StoreError(
                f"{path}: meta/episode_ends: chunk c/{c} is missing (episodes {c * per_chunk}.."
                f"{(c + 1) * per_chunk - 1}); the store is damaged: restore the file from a copy"
            )
    ends = np.asarray(_read_whole(path, "meta/episode_ends", ends_arr, 0, ends_arr.shape[0]), dtype=np.int64)
    if len(ends) and ends[-1] == 0:
        # Killed between growing episode_ends and writing its new entry (module docstring).
        warnings.warn(
            f"{path}: the last entry of meta/episode_ends was never written (interrupted append); "
            f"{'dropping' if repair else 'ignoring'} it",
            stacklevel=3,
        )
        ends = ends[:-1]
        if repair:
            ends_arr[len(ends)] = 0
            ends_arr.resize((len(ends),))
    steps = np.diff(ends, prepend=0)
    bad = np.flatnonzero(steps <= 0)
    if len(bad):
        i = int(bad[0])
        prev = int(ends[i - 1]) if i else 0
        raise StoreError(
            f"{path}: meta/episode_ends is not increasing: episode {i} ends at {int(ends[i])}, "
            f"not after {prev}"
        )
    n_steps = int(ends[-1]) if len(ends) else 0

    meta: dict[str, zarr.Array] = {}
    for field in META_FIELDS:
        arr = _member(path, root, f"meta/{field}")
        if arr.ndim != 1:
            raise StoreError(f"{path}: 'meta/{field}' must be 1-D, has shape {arr.shape}")
        if arr.shape[0] < len(ends):
            raise StoreError(
                f"{path}: 'meta/{field}' has {arr.shape[0]} entries but there are {len(ends)} episodes "
                f"(episode {arr.shape[0]} has no {field})"
            )
        meta[field] = arr

    for key, arr in data.items():
        if arr.shape[0] < n_steps:
            episode = int(np.searchsorted(ends, arr.shape[0], side="right"))
            raise StoreError(
                f"{path}: key {key!r} has {arr.shape[0]} steps but the episodes need {n_steps} "
                f"(episode {episode} is incomplete)"
            )
    # (array name, array, committed length) of every array longer than the committed episodes
    tails = [(f"data/{k}", a, n_steps) for k, a in data.items() if a.shape[0] > n_steps]
    tails += [(f"meta/{k}", a, len(ends)) for k, a in meta.items() if a.shape[0] > len(ends)]
    if tails:
        warnings.warn(
            f"{path}: arrays {[name for name, _, _ in tails]} run past the last episode end (an append "
            f"was interrupted); {'truncating' if repair else 'ignoring'} the tail",
            stacklevel=3,
        )
        if repair:
            for _, a, length in tails:
                a.resize((length, *a.shape[1:]))
    return data, meta, ends


def _check_same_schema(path: Path, have: DatasetSpec, want: DatasetSpec) -> None:
    for key in sorted(set(have.keys) | set(want.keys)):
        if key not in have.keys:
            raise StoreError(f"{path}: existing store has no key {key!r} that the new spec has")
        if key not in want.keys:
            raise StoreError(f"{path}: existing store has key {key!r} that the new spec lacks")
        if have.keys[key] != want.keys[key]:
            raise StoreError(
                f"{path}: key {key!r} differs: store has {have.keys[key]}, spec has {want.keys[key]}"
            )
    for attr in ("control_hz", "robot", "controller", "task"):
        if getattr(have, attr) != getattr(want, attr):
            raise StoreError(
                f"{path}: {attr} differs: store has {getattr(have, attr)!r}, spec has {getattr(want, attr)!r}"
            )
