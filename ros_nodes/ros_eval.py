"""robomosaic-ros-eval: success rate of a policy node driving the sim node, over ROS 2.

    robomosaic-sim-node --ros-args -r __node:=sim -p task:=lift -p step_mode:=realtime &
    robomosaic-policy-node --ros-args -r __node:=policy -p checkpoint:=runs/lift/best ... -p autostart:=true &
    robomosaic-ros-eval --ros-args -p episodes:=50 -p out:=docs/results/ros_eval_lift.json

For seeds seed_offset, ..., seed_offset + episodes - 1 (the seeds `robomosaic-eval` uses, so the two
reports compare) the driver disables the policy, sets the sim node's `seed` parameter and calls its
`~/reset`, resets the policy's history, enables it and waits for the sim's `~/episode` status to
report the episode done (success, or the sim's `max_steps`). The order depends on the sim's
`step_mode`: in realtime the policy is enabled after the reset (so it never sees the old episode);
in commanded mode, where the policy follows the sim's `/clock` (use_sim_time) and time moves only
when the sim steps, it is enabled before the reset, whose clock tick starts it.

Parameters: `episodes` (10), `seed_offset` (1000000; below 100000 needs `allow_training_seeds`),
`sim` (node name, "/sim"), `policy` ("/policy"), `episode_timeout` (wall seconds per episode; 0: 4 x
max_steps periods + 30 s), `out` (json report; "" prints it only).
The report holds per-seed success and steps, the success rate with its Wilson 95% interval and the
wall time of each episode.
"""

from __future__ import annotations

import datetime
import importlib
import json
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robomosaic.ros_nodes.common import BackgroundSpin, require_rclpy
from robomosaic.sim.measure_experts import machine, wilson_interval

PARAMETERS: dict[str, Any] = {
    "episodes": 10,
    "seed_offset": 1_000_000,
    "allow_training_seeds": False,
    "sim": "/sim",
    "policy": "/policy",
    "episode_timeout": 0.0,
    "out": "",
}
# As robomosaic-eval (robomosaic.policies.evaluate.MIN_SEED_OFFSET; not imported, that pulls in torch).
MIN_SEED_OFFSET = 100_000


class RosEvalError(RuntimeError):
    """The graph does not answer as expected; the message names the node, service or topic."""


def _make_driver_class():  # rclpy is imported only when a node is built
    require_rclpy()
    from rclpy.callback_groups import ReentrantCallbackGroup
    from rclpy.node import Node
    from rclpy.parameter import Parameter, parameter_value_to_python
    from rclpy.parameter_client import AsyncParameterClient
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    class RosEvalDriver(Node):
        """Calls services of the sim and policy nodes and follows the sim's episode status."""

        def __init__(self) -> None:
            super().__init__("ros_eval")
            self.params = {k: self.declare_parameter(k, v).value for k, v in PARAMETERS.items()}
            self.sim, self.policy = self.params["sim"].rstrip("/"), self.params["policy"].rstrip("/")
            self.group = ReentrantCallbackGroup()
            self._status: dict[str, Any] | None = None
            self._status_changed = threading.Condition()
            latched = QoSProfile(
                depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
            )
            self.create_subscription(
                String, f"{self.sim}/episode", self._on_status, latched, callback_group=self.group
            )
            self.sim_parameters = AsyncParameterClient(self, self.sim, callback_group=self.group)
            self._service_clients: dict[str, Any] = {}

        # -- status ---------------------------------------------------------------------------
        def _on_status(self, msg) -> None:
            with self._status_changed:
                self._status = json.loads(msg.data)
                self._status_changed.notify_all()

        def wait_status(self, predicate, timeout: float, what: str) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            with self._status_changed:
                while self._status is None or not predicate(self._status):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RosEvalError(f"{self.sim}/episode: no status with {what} in {timeout:.0f} s "
                                           f"(last: {self._status})")  # fmt: skip
                    self._status_changed.wait(left)
                return dict(self._status)

        # -- services and parameters ----------------------------------------------------------
        def call(self, service: str, timeout: float = 30.0) -> Any:
            """Call a std_srvs Trigger or SetBool(true) service, whichever type it has."""
            client = self._service_clients.get(service) or self._client(service, timeout)
            request = client.srv_type.Request()
            if hasattr(request, "data"):
                request.data = True
            response = self._wait(client.call_async(request), timeout, f"service {service}")
            if not response.success:
                raise RosEvalError(f"service {service} refused: {response.message}")
            return response

        def _client(self, service: str, timeout: float) -> Any:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                types = dict(self.get_service_names_and_types()).get(service)
                if types:
                    package, _, name = types[0].split("/")
                    srv_type = getattr(importlib.import_module(f"{package}.srv"), name)
                    client = self.create_client(srv_type, service, callback_group=self.group)
                    if client.wait_for_service(timeout_sec=max(0.1, deadline - time.monotonic())):
                        self._service_clients[service] = client
                        return client
                time.sleep(0.1)
            raise RosEvalError(
                f"service {service} is not available after {timeout:.0f} s: is the node running?"
            )

        def get_sim_parameter(self, name: str, timeout: float = 30.0) -> Any:
            if not self.sim_parameters.wait_for_services(timeout_sec=timeout):
                raise RosEvalError(f"node {self.sim} has no parameter services after {timeout:.0f} s")
            result = self._wait(self.sim_parameters.get_parameters([name]), timeout, f"{self.sim} {name}")
            return parameter_value_to_python(result.values[0])

        def set_sim_parameter(self, name: str, value: Any, timeout: float = 30.0) -> None:
            future = self.sim_parameters.set_parameters([Parameter(name, value=value)])
            result = self._wait(future, timeout, f"setting {self.sim} {name}")
            if not result.results[0].successful:
                raise RosEvalError(f"{self.sim} refused {name}={value}: {result.results[0].reason}")

        @staticmethod
        def _wait(future, timeout: float, what: str) -> Any:
            deadline = time.monotonic() + timeout
            while not future.done():
                if time.monotonic() > deadline:
                    raise RosEvalError(f"{what}: no answer after {timeout:.0f} s")
                time.sleep(0.005)
            return future.result()

    return RosEvalDriver


def run_episodes_over_ros(
    driver: Any, seeds: Sequence[int], episode_timeout: float = 0.0, log=print
) -> list[dict[str, Any]]:
    """Drive one episode per seed through the sim and policy nodes; per-episode results."""
    step_mode = driver.get_sim_parameter("step_mode")
    max_steps = int(driver.get_sim_parameter("max_steps")) or None
    results = []
    for seed in seeds:
        start = time.perf_counter()
        driver.call(f"{driver.policy}/disable")
        driver.set_sim_parameter("seed", int(seed))  # the next reset uses exactly this seed
        if step_mode == "commanded":  # time moves only with the sim: the reset's clock tick starts the policy
            driver.call(f"{driver.policy}/reset_history")
            driver.call(f"{driver.policy}/enable")
        reply = json.loads(driver.call(f"{driver.sim}/reset").message)
        if reply["seed"] != seed:
            raise RosEvalError(f"{driver.sim}/reset started seed {reply['seed']}, expected {seed}")
        episode = reply["episode"]
        driver.wait_status(lambda s, e=episode: s["episode"] == e, 30.0, f"episode {episode}")
        if step_mode != "commanded":
            driver.call(f"{driver.policy}/reset_history")
            driver.call(f"{driver.policy}/enable")
        limit = episode_timeout or 4 * (max_steps or 500) / 20.0 + 30.0
        status = driver.wait_status(lambda s, e=episode: s["episode"] == e and s["done"], limit, "done")
        driver.call(f"{driver.policy}/disable")
        result = {
            "seed": int(seed),
            "success": bool(status["success"]),
            "steps": int(status["step"]),
            "wall_s": time.perf_counter() - start,
        }
        log(f"seed {seed}: {'success' if result['success'] else 'failure'} after {result['steps']} steps "
            f"({result['wall_s']:.1f} s)")  # fmt: skip
        results.append(result)
    return results


def report(results: Sequence[dict[str, Any]], settings: dict[str, Any], command: str) -> dict[str, Any]:
    """The json report: success rate with its Wilson 95% interval, per-seed results."""
    n = len(results)
    successes = sum(r["success"] for r in results)
    return {
        "command": command,
        "settings": settings,
        "successes": successes,
        "success_rate": successes / n if n else 0.0,
        "ci95": list(wilson_interval(successes, n)) if n else [0.0, 1.0],
        "failed_seeds": [r["seed"] for r in results if not r["success"]],
        "per_episode": list(results),
        "wall_time_s": sum(r["wall_s"] for r in results),
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": machine(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """robomosaic-ros-eval (standard ROS arguments: --ros-args -p episodes:=10 ...)."""
    require_rclpy()
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    args = list(sys.argv if argv is None else ["robomosaic-ros-eval", *argv])
    rclpy.init(args=args)
    driver = _make_driver_class()()
    params = driver.params
    # one thread spins the callbacks (all short); this thread drives the episodes and waits on their
    # futures: the nodes' reason for a single-threaded executor (ros_nodes/common.py) holds here too
    executor = SingleThreadedExecutor()
    executor.add_node(driver)
    spinner = BackgroundSpin(executor)
    try:
        if params["episodes"] < 1:
            raise RosEvalError(f"parameter episodes={params['episodes']} must be >= 1")
        if params["seed_offset"] < MIN_SEED_OFFSET and not params["allow_training_seeds"]:
            raise RosEvalError(
                f"parameter seed_offset={params['seed_offset']} may overlap the demonstration seeds; "
                f"use seed_offset >= {MIN_SEED_OFFSET} or allow_training_seeds:=true"
            )
        seeds = [params["seed_offset"] + i for i in range(params["episodes"])]
        results = run_episodes_over_ros(driver, seeds, params["episode_timeout"], driver.get_logger().info)
        settings = {k: params[k] for k in ("episodes", "seed_offset", "sim", "policy")}
        settings["step_mode"] = driver.get_sim_parameter("step_mode")
        settings["task"] = driver.get_sim_parameter("task")
        result = report(results, settings, shlex.join(["robomosaic-ros-eval", *args[1:]]))
    except RosEvalError as e:
        raise SystemExit(f"robomosaic-ros-eval: {e}") from None
    finally:
        spinner.close()
        driver.destroy_node()
        rclpy.try_shutdown()
    text = json.dumps(result, indent=2) + "\n"
    print(f"success {result['successes']}/{len(results)} ({result['success_rate']:.0%})")
    if params["out"]:
        Path(params["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(params["out"]).write_text(text)
        print(f"wrote {params['out']}")
    else:
        print(text)


if __name__ == "__main__":
    main()
