"""Human teleoperation for robomosaic-collect: robosuite's Keyboard and SpaceMouse devices.

The loop is the one of robosuite's `scripts/collect_human_demonstrations.py`
(`collect_human_trajectory`): read the device, turn its action dict into the robot's action vector,
step, render, and end the episode when the operator resets (Ctrl+q) or ten steps after the task
first succeeds. The scene is shown in MuJoCo's own interactive viewer (`mujoco.viewer`, what
robosuite's default `mjviewer` renderer opens) on the task's simulation, so that the recording
goes through the same `Task` API as scripted collection. Both devices need an X display
(they listen to the keyboard through pynput); the SpaceMouse also needs `hidapi` and the device.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from robomosaic.conf.console import RobomosaicError

HUMAN_DEVICES = ("keyboard", "spacemouse")
SUCCESS_HOLD_STEPS = 10  # as collect_human_demonstrations.py: keep recording briefly after success


class DeviceError(RobomosaicError, RuntimeError):
    """A teleoperation device or the viewer could not be opened; the message says why."""


def require_display(device: str) -> None:
    """Fail early, before building anything, when there is no display to teleoperate on."""
    if (
        sys.platform.startswith("linux")
        and not os.environ.get("DISPLAY")
        and not os.environ.get("WAYLAND_DISPLAY")
    ):
        raise DeviceError(
            f"device={device}: needs a display for the viewer and for reading the keyboard (pynput), "
            "but DISPLAY is not set; run it in a desktop session (or ssh -X), or use device=scripted"
        )


def open_device(cfg: Any, env: Any) -> Any:
    """Open robosuite's `Keyboard` or `SpaceMouse` on a robosuite environment."""
    name = cfg.name
    require_display(name)
    try:
        if name == "keyboard":
            from robosuite.devices.keyboard import Keyboard

            return Keyboard(env=env, pos_sensitivity=cfg.pos_sensitivity, rot_sensitivity=cfg.rot_sensitivity)
        if name == "spacemouse":
            from robosuite.devices.spacemouse import SpaceMouse

            ids = {k: cfg[k] for k in ("vendor_id", "product_id") if cfg.get(k) is not None}
            return SpaceMouse(
                env=env, pos_sensitivity=cfg.pos_sensitivity, rot_sensitivity=cfg.rot_sensitivity, **ids
            )
    except ImportError as e:  # pynput without an X server, or hid (hidapi) not installed
        raise DeviceError(f"device={name}: cannot load robosuite's driver: {e}") from e
    except OSError as e:  # hid: no 3Dconnexion device found or no permission on /dev/hidraw*
        raise DeviceError(
            f"device={name}: cannot open the HID device ({e}); is it plugged in and readable "
            "(udev rule for /dev/hidraw*)?"
        ) from e
    raise DeviceError(f"device={name}: unknown device; choose scripted, {' or '.join(HUMAN_DEVICES)}")


def open_viewer(task: Any) -> Any:
    """MuJoCo's passive viewer on the task's model and data (on screen)."""
    try:
        import mujoco.viewer

        return mujoco.viewer.launch_passive(task.env.sim.model._model, task.env.sim.data._data)
    except Exception as e:  # GLFW raises several types when there is no usable display
        raise DeviceError(f"cannot open MuJoCo's viewer window: {e}") from e


def teleop_episode(
    task: Any, device: Any, viewer: Any, seed: int, max_fr: float | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Record one episode driven by `device`; None if the viewer was closed before any step."""
    obs = task.reset(seed)
    device.start_control()
    robot = task.env.robots[0]
    steps: dict[str, list[np.ndarray]] = {}
    hold, info = -1, task.info()
    for _ in range(task.max_steps):
        tick = time.time()
        if not viewer.is_running():
            break
        inputs = device.input2action()
        if inputs is None:  # the operator asked for a reset: the episode ends here
            break
        action_dict = dict(inputs)
        for arm in robot.arms:  # OSC_POSE in delta mode takes the device's delta command
            action_dict[arm] = inputs[f"{arm}_delta"]
        action = robot.create_action_vector(action_dict).astype(np.float32)
        state = task.get_state()
        next_obs, reward, _, _, info = task.step(action)
        for k, v in {**obs, "action": action, "reward": np.float32(reward), "state": state}.items():
            steps.setdefault(k, []).append(v)
        obs = next_obs
        viewer.sync()
        if hold == 0:
            break
        hold = (hold - 1 if hold > 0 else SUCCESS_HOLD_STEPS) if info["success"] else -1
        if max_fr:
            time.sleep(max(0.0, 1.0 / max_fr - (time.time() - tick)))
    if not steps:
        return None
    data = {k: np.stack(v) for k, v in steps.items()}
    meta = {
        "seed": seed,
        "success": bool(info["success"]),
        "task": task.name,
        "behaviour": info["behaviour"],
        "duration": len(data["action"]) / task.spec.control_hz,
    }
    return data, meta
