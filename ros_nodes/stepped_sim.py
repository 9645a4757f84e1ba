"""What robomosaic-sim-node and robomosaic-mobility-sim-node share: a simulator stepped by a ROS 2
node, in episodes drawn from a seed sequence. `stepped_sim_node_class()` builds the rclpy Node base
class (rclpy is imported only then); each node subclasses it with its parameters, its world, what it
publishes and its command topics.

Parameters (besides each node's own): `step_mode`, `seed`, `seeds`, `command_timeout` (default 0.2 s,
positive; what a stale command means is the node's), `publish_clock` (default true). `use_sim_time`
is refused: the node makes the simulated time.

Published after every step and reset (and whatever else starts an episode), stamped with the time of
the state, after the node's own topics:
- `/clock` rosgraph_msgs/Clock (`publish_clock`; keep last 1);
- `~/episode` std_msgs/String JSON {"seed", "episode", <the node's step and outcome fields>, "time"}
  (reliable, transient local, keep last 1).

Stepping (`step_mode`):
- `realtime`: a timer on the steady wall clock steps at the control rate with the command active at
  that time; time is the wall clock, as on hardware. The statistics of the timer's periods and of
  the step times are logged at the end of each episode and at shutdown ("realtime timing of the
  last episode: {...}").
- `commanded`: one step per received motion command, as fast as commands arrive. Time is simulated:
  it starts at the wall-clock time of the node's start and advances one control period per step and
  per reset, counted in integer nanoseconds (float seconds near 1.8e9 would make a 0.1 s period
  alternate between 100,000,000 and 99,999,744 ns), so consumers run with `use_sim_time:=true` and
  follow `/clock`. Commands are queued (the newest 10) and stepped on the executor (a guard
  condition), not in the subscription callback. While no command arrives, `/clock` is repeated,
  unchanged, every `IDLE_CLOCK_PERIOD` seconds of wall time: a follower whose subscription matched
  after the last one (DDS discovery is slow on a loaded machine) would otherwise keep time 0 and its
  control timer would never fire, so it would never send the command that starts the lock step.

Episodes: the node starts in the first seed's initial state. `~/reset` (std_srvs/Trigger; the reply's
message is JSON {"seed", "episode"}) starts the next seed: `seeds` when given, otherwise `seed`,
`seed`+1, ...; setting the parameter `seed` (or `seeds`) at run time restarts that sequence at the new
value, so the next reset uses it. In realtime mode a new episode stands still (its state published
every period, not stepped) until the first motion command arrives, so that a policy or an operator
starts it from exactly the seed's initial state. A done episode takes no more steps until the next
episode starts.

Steps and resets (and any callback a node adds to `step_group`) run in one mutually exclusive
callback group, so the world needs no lock; command callbacks run beside them in `command_group`.
"""

from __future__ import annotations

import functools
import json
import statistics
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from robomosaic.ros_nodes.common import require_rclpy

STEP_MODES = ("realtime", "commanded")
IDLE_CLOCK_PERIOD = 0.5  # s of wall time between repeats of an unchanged /clock (commanded mode)


class RealtimeStats:
    """Wall-clock periods between realtime ticks and the compute time of each step."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.periods: list[float] = []
        self.step_seconds: list[float] = []
        self._last: float | None = None

    def tick(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            self.periods.append(now - self._last)
        self._last = now

    def summary(self) -> dict[str, float]:
        if not self.periods:
            return {}
        ms = 1000 * np.asarray(self.periods)
        error = np.abs(ms - 1000 * self.period)
        return {
            "ticks": len(ms) + 1,
            "period_ms_mean": float(ms.mean()),
            "period_error_ms_p50": float(np.percentile(error, 50)),
            "period_error_ms_p99": float(np.percentile(error, 99)),
            "period_ms_max": float(ms.max()),
            "overruns": int(np.sum(ms > 1500 * self.period)),
            "step_ms_mean": 1000 * statistics.fmean(self.step_seconds) if self.step_seconds else 0.0,
        }

    def reset(self) -> None:
        self.periods, self.step_seconds, self._last = [], [], None


@functools.cache
def stepped_sim_node_class() -> type:
    """The base class `SteppedSimNode(rclpy.node.Node)`, built (and rclpy imported) on first call."""
    require_rclpy()
    from rcl_interfaces.msg import SetParametersResult
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.clock import Clock, ClockType
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock as ClockMsg
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from robomosaic.ros_nodes.common import nanoseconds_to_stamp, stamp_to_seconds

    common_parameters = {
        "step_mode": "realtime",
        "seed": 0,
        "seeds": Parameter.Type.INTEGER_ARRAY,  # typed, unset: seed, seed + 1, ...
        "command_timeout": 0.2,
        "publish_clock": True,
    }

    class SteppedSimNode(Node):
        """A node implements the hooks below; `__init__` calls `_setup` with the parameter values."""

        def __init__(self, name: str, script: str, parameters: dict[str, Any]) -> None:
            """`script` names the node in errors; `parameters` are the node's own, name: default (or
            an array type: unset, the value is [])."""
            super().__init__(name)
            p = {}
            for key, default in {**parameters, **common_parameters}.items():
                value = self.declare_parameter(key, default).value
                p[key] = [] if value is None and isinstance(default, Parameter.Type) else value
            if self.get_parameter("use_sim_time").value:
                raise ValueError(f"{script} makes the simulated time: do not set use_sim_time on it")
            if p["step_mode"] not in STEP_MODES:
                raise ValueError(f"parameter step_mode={p['step_mode']!r} must be one of {STEP_MODES}")
            if p["command_timeout"] <= 0:
                raise ValueError(f"parameter command_timeout={p['command_timeout']} must be positive")
            self.step_mode = p["step_mode"]
            self._seeds = [int(s) for s in p["seeds"]]
            self._first_seed = int(p["seed"])
            self._next_index = 0
            self.seed, self.episode = self._first_seed, -1
            self.done = self.started = False
            self.step_group = MutuallyExclusiveCallbackGroup()
            self.command_group = MutuallyExclusiveCallbackGroup()
            self.dt = self._setup(p)
            self._dt_ns = round(self.dt * 1e9)
            self.stats = RealtimeStats(self.dt)

            self.pub_clock = (
                self.create_publisher(ClockMsg, "/clock", QoSProfile(depth=1)) if p["publish_clock"] else None
            )
            latched = QoSProfile(
                depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
            )
            self.pub_episode = self.create_publisher(String, "~/episode", latched)
            self.create_service(Trigger, "~/reset", self._on_reset, callback_group=self.step_group)
            self.add_on_set_parameters_callback(self._on_set_parameters)

            self._pending: deque[Any] = deque(maxlen=10)
            self._pending_lock = threading.Lock()
            self._time_ns = self._wall_ns()  # commanded mode: the simulated time
            self._last_publish = time.monotonic()
            steady = Clock(clock_type=ClockType.STEADY_TIME)
            if self.step_mode == "realtime":
                self.create_timer(self.dt, self._on_tick, callback_group=self.step_group, clock=steady)
            else:
                self._wake = self.create_guard_condition(self._on_commanded, callback_group=self.step_group)
                self.create_timer(
                    IDLE_CLOCK_PERIOD, self._on_idle, callback_group=self.step_group, clock=steady
                )
            self._start_episode()
            self.get_logger().info(f"{self._describe()}, episode seed {self.seed}")

        # -- what a node supplies -----------------------------------------------------------------
        def _setup(self, p: dict[str, Any]) -> float:
            """Check the node's parameters `p`, build its world, publishers and command subscriptions
            (in `command_group`, calling `_command`); return the control period in seconds."""
            raise NotImplementedError

        def _describe(self) -> str:
            """The start log line, before ", episode seed <seed>"."""
            raise NotImplementedError

        def _reset_world(self, seed: int) -> None:
            raise NotImplementedError

        def _apply_command(self, command: Any, received: float) -> None:
            """Make `command` (what was passed to `_command`) the active one, received at `received`."""
            raise NotImplementedError

        def _action_at(self, now: float, fresh: bool) -> np.ndarray:
            """The action of the active command at `now`; `fresh`: it was applied now (commanded)."""
            raise NotImplementedError

        def _step_world(self, action: np.ndarray) -> None:
            """One step with `action`; sets `done` when the episode ends."""
            raise NotImplementedError

        def _publish_state(self, stamp: Any) -> None:
            """Publish the node's own topics, stamped `stamp` (builtin_interfaces/Time)."""
            raise NotImplementedError

        def _status(self) -> dict[str, Any]:
            """The ~/episode fields between "episode" and "time" (step, outcome, done)."""
            raise NotImplementedError

        # -- time ---------------------------------------------------------------------------------
        def _wall_ns(self) -> int:
            return self.get_clock().now().nanoseconds

        def _now_ns(self) -> int:
            return self._wall_ns() if self.step_mode == "realtime" else self._time_ns

        def now(self) -> float:
            """The robot's time in seconds: the wall clock (realtime) or the simulated time (commanded)."""
            return self._now_ns() * 1e-9

        # -- episodes -----------------------------------------------------------------------------
        def _start_episode(self) -> None:
            """The next seed's episode."""
            seq, index = self._seeds, self._next_index
            self.seed = seq[index % len(seq)] if seq else self._first_seed + index
            self._next_index += 1
            self._log_realtime_stats()
            self.stats.reset()
            self._reset_world(self.seed)
            self._new_episode()
            if self.step_mode == "commanded":
                self._time_ns += self._dt_ns  # a reset takes one period: followers' timers see time move
            self._publish()

        def _new_episode(self) -> None:
            """A new episode from the world's current state; a node extends it to clear its own
            episode state and commands."""
            self.episode += 1
            self.done = False
            self.started = False  # realtime: the first motion command starts the episode's steps
            with self._pending_lock:
                self._pending.clear()

        def _on_reset(self, request: Any, response: Any) -> Any:
            self._start_episode()
            response.success = True
            response.message = json.dumps({"seed": self.seed, "episode": self.episode})
            return response

        def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
            for param in params:
                if param.name == "seed":
                    self._first_seed, self._seeds, self._next_index = int(param.value), [], 0
                elif param.name == "seeds":
                    self._seeds, self._next_index = [int(s) for s in param.value], 0
            return SetParametersResult(successful=True)

        # -- stepping -----------------------------------------------------------------------------
        def _command(self, command: Any) -> None:
            """A motion command arrived: active at once (realtime) or queued for one step (commanded)."""
            if self.step_mode == "realtime":
                self.started = True
                self._apply_command(command, received=self.now())
            else:
                with self._pending_lock:
                    self._pending.append(command)
                self._wake.trigger()

        def _step(self, action: np.ndarray) -> None:
            start = time.perf_counter()
            self._step_world(action)
            self.stats.step_seconds.append(time.perf_counter() - start)

        def _on_tick(self) -> None:
            self.stats.tick()
            if self.started and not self.done:
                self._step(self._action_at(self.now(), fresh=False))
            self._publish()

        def _on_commanded(self) -> None:
            while True:
                with self._pending_lock:
                    if not self._pending:
                        return
                    command = self._pending.popleft()
                if self.done:
                    continue  # a done episode takes no steps until the next one starts
                self._apply_command(command, received=self.now())
                self._step(self._action_at(self.now(), fresh=True))
                self._time_ns += self._dt_ns
                self._publish()

        def _on_idle(self) -> None:
            """Commanded mode: repeat the unchanged /clock when nothing was published for a while."""
            if self.pub_clock is not None and time.monotonic() - self._last_publish >= IDLE_CLOCK_PERIOD:
                self.pub_clock.publish(ClockMsg(clock=nanoseconds_to_stamp(self._time_ns)))
                self._last_publish = time.monotonic()

        # -- publishing ---------------------------------------------------------------------------
        def _publish(self) -> None:
            """The state at the robot's time now: the node's topics, /clock and ~/episode."""
            stamp = nanoseconds_to_stamp(self._now_ns())
            self._last_publish = time.monotonic()
            self._publish_state(stamp)
            if self.pub_clock is not None:
                self.pub_clock.publish(ClockMsg(clock=stamp))
            status = {"seed": self.seed, "episode": self.episode, **self._status()}
            status["time"] = stamp_to_seconds(stamp)
            self.pub_episode.publish(String(data=json.dumps(status)))

        def _log_realtime_stats(self) -> None:
            if self.step_mode == "realtime" and self.stats.periods:
                self.get_logger().info(f"realtime timing of the last episode: {self.stats.summary()}")

        def on_shutdown(self) -> None:
            self._log_realtime_stats()
            # The world is not closed here: a step may still run on another executor thread; the
            # process ends next.

    return SteppedSimNode
