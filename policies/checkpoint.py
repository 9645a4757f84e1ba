"""Checkpoint folders that never unpickle.

    <dir>/config.yaml              the resolved config that rebuilds the policy
    <dir>/<part>.safetensors       weights, normalizer statistics, ... (one file per part)
    <dir>/spec.json                format version, policy class, observation/action spec,
                                   provenance, and the sha256 of every other file

Loading checks the format version, that every listed file stays inside the folder (no absolute
path, `..` or symlink out), exists and hashes to what spec.json says (a tampered or truncated file
is rejected by name), that every safetensors file parses (safetensors never unpickles) and every
floating tensor is finite, and leaves it to the policy class to check that every tensor it expects
is present with the right shape (`check_state_dict`) and that spec.json describes the policy that
config.yaml and the weights build (`check_spec_fields`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robomosaic.conf.console import RobomosaicError, one_line
from robomosaic.data.spec import KeySpec

FORMAT = "robomosaic-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RobomosaicError, ValueError):
    """A checkpoint folder that cannot be loaded; the message names the folder and the culprit."""


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    spec: dict[str, Any]
    parts: dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ChunkInterface:
    """What a chunk policy's spec.json says about its inputs and outputs: enough to wire it to a robot
    without building the model (the policy node does that when inference runs in another process)."""

    policy_class: str
    obs_spec: dict[str, KeySpec]
    action_spec: KeySpec
    horizon: int
    n_obs_steps: int
    n_action_steps: int

    @classmethod
    def from_spec(cls, path: str | Path, spec: Mapping[str, Any]) -> ChunkInterface:
        try:
            return cls(
                policy_class=str(spec["policy_class"]),
                obs_spec={k: KeySpec.from_dict(v) for k, v in spec["obs"].items()},
                action_spec=KeySpec.from_dict(spec["action"]),
                horizon=int(spec["horizon"]),
                n_obs_steps=int(spec["n_obs_steps"]),
                n_action_steps=int(spec["n_action_steps"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(
                f"{Path(path) / 'spec.json'}: missing or malformed entry {e} (a chunk policy's spec has "
                "policy_class, obs, action, horizon, n_obs_steps and n_action_steps)"
            ) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def spec_digest(folder: Path) -> str:
    """The sha256 of a checkpoint folder's spec.json, which itself hashes every other file: what a
    checkpoint that references another one (composed parents, a residual's base) records."""
    return hashlib.sha256((Path(folder) / "spec.json").read_bytes()).hexdigest()


def provenance() -> dict[str, Any]:
    """Where and when a checkpoint was made: enough to find the code that made it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }


def save_checkpoint(
    path: str | Path,
    policy_class: str,
    config: Mapping[str, Any],
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    spec: Mapping[str, Any],
) -> Path:
    """Write a checkpoint folder; files are written first and spec.json (with their hashes) last."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    (path / "config.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
    files["config.yaml"] = _sha256(path / "config.yaml")
    for name, tensors in parts.items():
        if not name.isidentifier():
            raise CheckpointError(f"checkpoint part name {name!r} must be an identifier")
        file = path / f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(file))
        files[file.name] = _sha256(file)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "policy_class": policy_class,
        **dict(spec),
        "provenance": provenance(),
        "files": files,
    }
    tmp = path / "spec.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path / "spec.json")
    return path


def read_checkpoint(path: str | Path, load_parts: bool = True) -> Checkpoint:
    """Read and verify a checkpoint folder (see module docstring); ``load_parts=False`` verifies the
    files but leaves the tensors on disk (``parts`` is empty), for readers of the spec alone."""
    path = Path(path)
    spec_file = path / "spec.json"
    if not spec_file.is_file():
        raise CheckpointError(f"{path}: not a robomosaic checkpoint (no spec.json)")
    try:
        spec = json.loads(spec_file.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{spec_file}: not valid json: {e}") from None
    if not isinstance(spec, dict):
        raise CheckpointError(f"{spec_file}: expected a json object")
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"{spec_file}: format is {spec.get('format')!r}, expected {FORMAT!r}")
    if spec.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{spec_file}: format_version {spec.get('format_version')!r} is not supported "
            f"(this robomosaic reads version {FORMAT_VERSION})"
        )
    files = spec.get("files")
    if not isinstance(files, dict) or "config.yaml" not in files:
        raise CheckpointError(f"{spec_file}: the 'files' table is missing or lacks config.yaml")
    for name in files:
        _inside(path, name)  # before any file is opened: an entry may name /dev/zero
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: file {name} listed in spec.json is missing")
        if _sha256(file) != digest:
            raise CheckpointError(
                f"{file}: contents do not match its sha256 in spec.json (modified or corrupt)"
            )
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'config.yaml'}: not valid yaml: {one_line(e)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / 'config.yaml'}: expected a mapping")
    parts = {
        name.removesuffix(".safetensors"): load_tensors(path / name)
        for name in files
        if name.endswith(".safetensors") and load_parts
    }
    return Checkpoint(path=path, config=config, spec=spec, parts=parts)


def _inside(path: Path, name: str) -> Path:
    """The file `name` of spec.json's files table, refused if it leaves the folder `path`."""
    file = path / name
    leaves = Path(name).is_absolute() or ".." in Path(name).parts
    if leaves or not file.resolve().is_relative_to(path.resolve()):
        raise CheckpointError(
            f"{path / 'spec.json'}: file entry {name!r} leaves the checkpoint folder "
            "(absolute path, '..' or a symlink pointing outside)"
        )
    return file


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never unpickles); every floating tensor must be finite."""
    try:
        tensors = load_file(str(file))
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({one_line(e)})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{file}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) of {tensor.numel()}"
            )
    return tensors


_MISSING = object()


def check_spec_fields(
    path: Path, spec: Mapping[str, Any], model: Mapping[str | tuple[str, ...], Any]
) -> None:
    """Raise a CheckpointError naming the first field of spec.json whose value is not the model's.

    `model` maps a field (`"horizon"`, or a path such as `("obs", key, "shape")`) to the value the
    policy built from config.yaml and its weights has; values compare as json (tuples equal lists).
    """
    for field, value in model.items():
        keys = (field,) if isinstance(field, str) else field
        found: Any = spec
        for key in keys:
            found = found.get(key, _MISSING) if isinstance(found, Mapping) else _MISSING
        if found is _MISSING or found != json.loads(json.dumps(value)):
            shown = "missing" if found is _MISSING else json.dumps(found)
            raise CheckpointError(
                f"{path / 'spec.json'}: {'.'.join(keys)} is {shown}, but the policy built from "
                f"config.yaml and the weights has {json.dumps(value)}"
            )


def check_state_dict(
    where: str, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> None:
    """Raise a CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for key, value in expected.items():
        if tuple(found[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {tuple(found[key].shape)}, "
                f"the config builds {tuple(value.shape)}"
            )


POLICY_CLASSES: dict[str, Callable[[Checkpoint], Any]] = {}
# Policy kinds are found through this entry-point group: a package (this one included, see
# pyproject.toml) declares `<policy_class> = "module:loader"` and `load_policy` imports the module
# the first time a checkpoint of that class is loaded. Nothing here lists the kinds.
ENTRY_POINT_GROUP = "robomosaic.policies"


def register_policy(name: str) -> Callable[[Callable[[Checkpoint], Any]], Callable[[Checkpoint], Any]]:
    """Register a loader `from_checkpoint(ckpt) -> policy` under the policy class name in spec.json
    (for policy kinds defined outside an installed package; installed ones use the entry point)."""

    def wrap(loader: Callable[[Checkpoint], Any]) -> Callable[[Checkpoint], Any]:
        POLICY_CLASSES[name] = loader
        return loader

    return wrap


def policy_loader(name: str, where: Path) -> Callable[[Checkpoint], Any]:
    """The loader registered for a policy class, from `register_policy` or the entry points."""
    if name in POLICY_CLASSES:
        return POLICY_CLASSES[name]
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise CheckpointError(
            f"{where}: policy class {name!r} is unknown; known: {sorted(set(found) | set(POLICY_CLASSES))} "
            f"(a policy kind registers itself with register_policy or the {ENTRY_POINT_GROUP!r} entry points)"
        )
    POLICY_CLASSES[name] = found[name].load()
    return POLICY_CLASSES[name]


def load_policy(path: str | Path) -> Any:
    """Any policy of the project, from its checkpoint folder."""
    ckpt = read_checkpoint(path)
    return policy_loader(str(ckpt.spec.get("policy_class")), ckpt.path)(ckpt)
