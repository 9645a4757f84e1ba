"""robomosaic-launch: run the package's ROS 2 XML launch files where `ros2 launch` is not installed.

`ros2 launch robomosaic sim_arm_policy.launch.xml checkpoint:=runs/lift/best` on a ROS 2 machine and
`robomosaic-launch sim_arm_policy.launch.xml checkpoint:=runs/lift/best` on a machine with rclpy from
pip run the same files. `launch`/`launch_ros` are not on PyPI, so this module implements the subset of
the XML front end that our files use, with ros2 launch's semantics:

- `<launch>`; `<arg name default description>` (no default: the argument is required);
  `<let name value>`; `<include file>` with `<arg name value>` children; `<group scoped>` with
  `<push-ros-namespace namespace>`; `if`/`unless` on node, include and group.
- `<node pkg exec name namespace args ros_args output on_exit>` with `<param name value>` (nested
  `<param name>` blocks give dotted names), `<param from="file.yaml">`, `<remap from to>`, `<env name value>`.
- substitutions `$(var x)`, `$(env X [default])`, `$(optenv X [default])`, `$(find-pkg-share pkg)`,
  `$(find-pkg-prefix pkg)`, `$(dirname)`.

Each node becomes a child process: `<exe> args --ros-args -r __node:=name -r __ns:=/ns
--params-file f.yaml -p k:=v -r from:=to ros_args`, parameter files before single parameters as
launch_ros orders them (later values win in rcl). Output is streamed line by line with a `[name]`
prefix. SIGINT/SIGTERM stop the children: SIGINT, then SIGTERM after `sigterm_timeout` (5 s), then
SIGKILL after `sigkill_timeout` (5 s more), as ros2 launch does. A node with `on_exit="shutdown"`
(ROS 1's required="true") that exits shuts the others down, and robomosaic-launch exits with that
node's status. Exit status: 0 after a requested shutdown in which every child stopped by itself;
the required node's status (128 + signal for a signal) when one ended the launch; 1 when all
nodes exited on their own and one of them failed, or when a child had to be killed.

Executables resolve as `ros2 run` does, `<prefix>/lib/<pkg>/<exec>` of the package's ament prefix; for
`robomosaic` without an install (a source checkout), `exec="robomosaic-foo-bar"` falls back to
`python -m robomosaic.ros_nodes.foo_bar`, the module behind that console script.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

PACKAGE = "robomosaic"
#: launch-wide configurations ros2 launch reads without a declaration
GLOBAL_CONFIGURATIONS = {"sigterm_timeout": "5", "sigkill_timeout": "5"}


class LaunchError(Exception):
    """A launch file or launch argument is wrong; the message names the file, line and element."""


# --------------------------------------------------------------------------------------------------
# XML with line numbers (xml.etree drops them, and every error must point at a line)


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    line: int
    children: list[Element] = field(default_factory=list)


def parse_xml(path: Path) -> Element:
    stack: list[Element] = []
    root: list[Element] = []
    parser = expat.ParserCreate()

    def start(tag: str, attrs: dict[str, str]) -> None:
        element = Element(tag, attrs, parser.CurrentLineNumber)
        (stack[-1].children if stack else root).append(element)
        stack.append(element)

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: stack.pop()
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as e:
        raise LaunchError(f"{path}:{e.lineno}: not well-formed XML: {expat.errors.messages[e.code]}") from e
    if root[0].tag != "launch":
        raise LaunchError(f"{path}:{root[0].line}: the root element must be <launch>, not <{root[0].tag}>")
    return root[0]


# --------------------------------------------------------------------------------------------------
# Packages: the ament index when AMENT_PREFIX_PATH is set, else this installation


def _ament_prefix(package: str) -> Path | None:
    if not os.environ.get("AMENT_PREFIX_PATH"):
        return None
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix

    try:
        return Path(get_package_prefix(package))
    except PackageNotFoundError:
        return None


def _source_checkout() -> Path | None:
    """The repository when robomosaic is installed editable (ros_nodes/ next to package.xml)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "package.xml").is_file() and (root / "launch").is_dir() else None


def package_share(package: str) -> Path:
    """`$(find-pkg-share package)`.

    For robomosaic without an ament index entry: an editable install's source checkout first (pip
    copies data files at install time, so `sys.prefix/share` goes stale as launch/ is edited), then
    `sys.prefix/share/robomosaic` of a regular install.
    """
    prefix = _ament_prefix(package)
    if prefix is not None:
        return prefix / "share" / package
    if package == PACKAGE:
        checkout = _source_checkout()
        if checkout is not None:
            return checkout
        installed = Path(sys.prefix) / "share" / PACKAGE
        if (installed / "package.xml").is_file():
            return installed
    raise LaunchError(
        f"package {package!r} not found: AMENT_PREFIX_PATH="
        f"{os.environ.get('AMENT_PREFIX_PATH', '(unset)')} (source its setup.bash)"
    )


def package_prefix(package: str) -> Path:
    """`$(find-pkg-prefix package)`."""
    prefix = _ament_prefix(package)
    if prefix is not None:
        return prefix
    if package == PACKAGE:
        return Path(sys.prefix)
    raise LaunchError(f"package {package!r} not found: AMENT_PREFIX_PATH is not set")


def node_command(package: str, executable: str) -> list[str]:
    """The command `ros2 run package executable` runs."""
    prefix = _ament_prefix(package) or (Path(sys.prefix) if package == PACKAGE else None)
    candidate = prefix / "lib" / package / executable if prefix is not None else None
    if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
        return [str(candidate)]
    looked = [str(candidate)] if candidate is not None else []
    if package == PACKAGE and executable.startswith(PACKAGE + "-"):
        module = f"{PACKAGE}.ros_nodes.{executable[len(PACKAGE) + 1 :].replace('-', '_')}"
        if importlib.util.find_spec(module) is not None:
            return [sys.executable, "-m", module]
        looked.append(f"module {module}")
    if not looked:
        ament = os.environ.get("AMENT_PREFIX_PATH", "(unset)")
        raise LaunchError(f"package {package!r} not found (AMENT_PREFIX_PATH={ament}): source its setup.bash")
    raise LaunchError(
        f"no executable {executable!r} in package {package!r} (looked for {' and '.join(looked)})"
    )


def find_launch_file(name: str) -> Path:
    """A path, or a file name under share/robomosaic (searched recursively, as ros2 launch does)."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    share = package_share(PACKAGE)
    found = sorted(share.rglob(path.name)) if share.is_dir() else []
    if found:
        return found[0]
    available = sorted(p.name for p in share.rglob("*.launch.xml"))
    raise LaunchError(f"launch file {name!r} not found in {share} (available: {', '.join(available)})")


# --------------------------------------------------------------------------------------------------
# Evaluation of a launch file into node processes


@dataclass
class NodeSpec:
    label: str
    command: list[str]
    env: dict[str, str]
    required: bool
    where: str


@dataclass
class ArgDecl:
    name: str
    default: str | None
    description: str
    where: str


@dataclass
class Scope:
    file: Path
    config: dict[str, str]
    namespace: str = ""

    def child(self, file: Path | None = None) -> Scope:
        return Scope(file or self.file, dict(self.config), self.namespace)


ALLOWED = {
    "launch": {"version"},
    "arg": {"name", "default", "description"},
    "let": {"name", "value"},
    "include": {"file", "if", "unless"},
    "group": {"scoped", "if", "unless"},
    "push-ros-namespace": {"namespace"},
    "node": {"pkg", "exec", "name", "namespace", "args", "ros_args", "output", "on_exit", "if", "unless"},
    "param": {"name", "value", "from"},
    "remap": {"from", "to"},
    "env": {"name", "value"},
}
ACTIONS = ("arg", "let", "include", "group", "push-ros-namespace", "node")


class Launcher:
    """Walks a launch file (and its includes) into NodeSpecs.

    lenient=True (for --show-args) gives required arguments a placeholder instead of failing and skips
    resolving executables and parameter files.
    """

    def __init__(self, arguments: dict[str, str], lenient: bool = False) -> None:
        self.arguments = arguments
        self.lenient = lenient
        self.nodes: list[NodeSpec] = []
        self.declared: list[ArgDecl] = []

    def run_file(self, path: Path, config: dict[str, str] | None = None) -> None:
        root = parse_xml(path)
        scope = Scope(path, {**GLOBAL_CONFIGURATIONS, **(config if config is not None else self.arguments)})
        self._check(root, scope)
        self._actions(root.children, scope)

    # -- helpers
    def _where(self, element: Element, scope: Scope) -> str:
        return f"{scope.file}:{element.line}: <{element.tag}>"

    def _check(self, element: Element, scope: Scope) -> None:
        allowed = ALLOWED.get(element.tag)
        if allowed is None:
            raise LaunchError(
                f"{self._where(element, scope)}: unsupported element "
                f"(robomosaic-launch supports {', '.join(f'<{t}>' for t in ALLOWED)})"
            )
        unknown = sorted(set(element.attrs) - allowed)
        if unknown:
            raise LaunchError(
                f"{self._where(element, scope)}: unsupported attribute(s) {', '.join(unknown)} "
                f"(allowed: {', '.join(sorted(allowed))})"
            )

    def _attr(self, element: Element, scope: Scope, name: str, default: str | None = None) -> str:
        raw = element.attrs.get(name)
        if raw is None:
            if default is None:
                raise LaunchError(f"{self._where(element, scope)}: missing attribute {name!r}")
            return default
        return self._substitute(raw, element, scope)

    def _enabled(self, element: Element, scope: Scope) -> bool:
        for key, expect in (("if", True), ("unless", False)):
            if key in element.attrs:
                value = self._attr(element, scope, key).strip().lower()
                if value not in ("true", "1", "false", "0"):
                    raise LaunchError(f"{self._where(element, scope)}: {key}={value!r} is not true/false/1/0")
                if (value in ("true", "1")) != expect:
                    return False
        return True

    # -- substitutions $(name arg ...)
    def _substitute(self, text: str, element: Element, scope: Scope) -> str:
        out, i = [], 0
        while True:
            j = text.find("$(", i)
            if j < 0:
                return "".join([*out, text[i:]])
            out.append(text[i:j])
            i, value = self._substitution(text, j + 2, element, scope)
            out.append(value)

    def _substitution(self, text: str, i: int, element: Element, scope: Scope) -> tuple[int, str]:
        """Parse `name args...)` from text[i:] (nested $(...) and quoted args allowed); evaluate it."""
        tokens: list[str] = []
        token: list[str] | None = None
        quote = None
        while i < len(text):
            c = text[i]
            if quote:
                if c == quote:
                    quote = None
                else:
                    token.append(c)
                i += 1
            elif c in "'\"":
                quote, token = c, token if token is not None else []
                i += 1
            elif text.startswith("$(", i):
                i, value = self._substitution(text, i + 2, element, scope)
                token = [*(token or []), value]
            elif c == ")" or c.isspace():
                if token is not None:
                    tokens.append("".join(token))
                    token = None
                i += 1
                if c == ")":
                    return i, self._evaluate(tokens, element, scope)
            else:
                token = [*(token or []), c]
                i += 1
        raise LaunchError(f"{self._where(element, scope)}: unterminated substitution in {text!r}")

    def _evaluate(self, tokens: list[str], element: Element, scope: Scope) -> str:
        where = self._where(element, scope)
        if not tokens:
            raise LaunchError(f"{where}: empty substitution $()")
        name, args = tokens[0], tokens[1:]
        arity = {"var": (1, 1), "env": (1, 2), "optenv": (1, 2), "find-pkg-share": (1, 1)}
        arity |= {"find-pkg-prefix": (1, 1), "dirname": (0, 0)}
        if name not in arity:
            raise LaunchError(f"{where}: unsupported substitution $({name}) (supported: {', '.join(arity)})")
        low, high = arity[name]
        if not low <= len(args) <= high:
            raise LaunchError(f"{where}: $({name}) takes {low}-{high} argument(s), got {args}")
        if name == "var":
            if args[0] not in scope.config:
                raise LaunchError(
                    f"{where}: undefined launch argument $(var {args[0]}) (declare it with <arg>)"
                )
            return scope.config[args[0]]
        if name in ("env", "optenv"):
            value = os.environ.get(args[0], args[1] if len(args) > 1 else None)
            if value is None:
                if name == "optenv":
                    return ""
                raise LaunchError(f"{where}: environment variable {args[0]} is not set and has no default")
            return value
        if name == "dirname":
            return str(scope.file.parent)
        try:
            return str(package_share(args[0]) if name == "find-pkg-share" else package_prefix(args[0]))
        except LaunchError as e:
            raise LaunchError(f"{where}: {e}") from None

    # -- actions
    def _actions(self, elements: list[Element], scope: Scope) -> None:
        for element in elements:
            self._check(element, scope)
            if element.tag not in ACTIONS:
                raise LaunchError(f"{self._where(element, scope)}: <{element.tag}> is not allowed here")
            getattr(self, "_do_" + element.tag.replace("-", "_"))(element, scope)

    def _do_arg(self, element: Element, scope: Scope) -> None:
        name = self._attr(element, scope, "name")
        default = element.attrs.get("default")
        where = self._where(element, scope)
        self.declared.append(ArgDecl(name, default, element.attrs.get("description", ""), where))
        if name in scope.config and name not in GLOBAL_CONFIGURATIONS:
            return
        if default is not None:
            scope.config[name] = self._substitute(default, element, scope)
        elif self.lenient:
            scope.config[name] = f"<{name}>"
        else:
            raise LaunchError(f"{where}: launch argument {name!r} is required: pass {name}:=<value>")

    def _do_let(self, element: Element, scope: Scope) -> None:
        scope.config[self._attr(element, scope, "name")] = self._attr(element, scope, "value")

    def _do_push_ros_namespace(self, element: Element, scope: Scope) -> None:
        scope.namespace = _join_namespace(scope.namespace, self._attr(element, scope, "namespace"))

    def _do_group(self, element: Element, scope: Scope) -> None:
        if not self._enabled(element, scope):
            return
        scoped = self._attr(element, scope, "scoped", "true").lower() != "false"
        self._actions(element.children, scope.child() if scoped else scope)

    def _do_include(self, element: Element, scope: Scope) -> None:
        if not self._enabled(element, scope):
            return
        child = scope.child()
        for arg in element.children:
            if arg.tag != "arg" or set(arg.attrs) != {"name", "value"}:
                raise LaunchError(
                    f"{self._where(arg, scope)}: <include> takes only <arg name value> children"
                )
            child.config[self._attr(arg, scope, "name")] = self._attr(arg, scope, "value")
        path = Path(self._attr(element, scope, "file"))
        if not path.is_absolute():
            path = scope.file.parent / path
        if not path.is_file():
            raise LaunchError(f"{self._where(element, scope)}: included file {path} does not exist")
        root = parse_xml(path)
        child.file = path
        self._check(root, child)
        self._actions(root.children, child)

    def _do_node(self, element: Element, scope: Scope) -> None:
        if not self._enabled(element, scope):
            return
        where = self._where(element, scope)
        package, executable = self._attr(element, scope, "pkg"), self._attr(element, scope, "exec")
        name = self._attr(element, scope, "name", "")
        namespace = _join_namespace(scope.namespace, self._attr(element, scope, "namespace", ""))
        on_exit = self._attr(element, scope, "on_exit", "")
        if on_exit not in ("", "shutdown"):
            raise LaunchError(f"{where}: on_exit={on_exit!r}: only 'shutdown' is supported")
        ros_args: list[str] = []
        if name:
            ros_args += ["-r", f"__node:={name}"]
        if namespace:
            ros_args += ["-r", f"__ns:={namespace}"]
        files, values, remaps, env = [], [], [], {}
        for child in element.children:
            self._check(child, scope)
            if child.tag == "param":
                self._param(child, scope, "", files, values)
            elif child.tag == "remap":
                remaps += ["-r", f"{self._attr(child, scope, 'from')}:={self._attr(child, scope, 'to')}"]
            elif child.tag == "env":
                env[self._attr(child, scope, "name")] = self._attr(child, scope, "value")
            else:
                raise LaunchError(f"{self._where(child, scope)}: not allowed inside <node>")
        ros_args += [a for f in files for a in ("--params-file", f)]
        ros_args += [a for v in values for a in ("-p", v)]
        ros_args += remaps + shlex.split(self._attr(element, scope, "ros_args", ""))
        command = [] if self.lenient else self._command(package, executable, where)
        command += [*shlex.split(self._attr(element, scope, "args", "")), "--ros-args", *ros_args]
        labels = {n.label for n in self.nodes}
        label, k = name or executable, 1
        while label in labels:
            k += 1
            label = f"{name or executable}-{k}"
        self.nodes.append(NodeSpec(label, command, env, on_exit == "shutdown", where))

    def _command(self, package: str, executable: str, where: str) -> list[str]:
        try:
            return node_command(package, executable)
        except LaunchError as e:
            raise LaunchError(f"{where}: {e}") from None

    def _param(
        self, element: Element, scope: Scope, prefix: str, files: list[str], values: list[str]
    ) -> None:
        where = self._where(element, scope)
        if "from" in element.attrs:
            if prefix or {"name", "value"} & set(element.attrs) or element.children:
                raise LaunchError(f"{where}: <param from> takes no name, value or children and cannot nest")
            path = Path(self._attr(element, scope, "from"))
            if not path.is_absolute():
                path = scope.file.parent / path
            if not self.lenient and not path.is_file():
                raise LaunchError(f"{where}: parameter file {path} does not exist")
            files.append(str(path))
            return
        name = prefix + self._attr(element, scope, "name")
        if ("value" in element.attrs) == bool(element.children):
            raise LaunchError(f"{where}: parameter {name!r} needs either a value or nested <param>s")
        if "value" in element.attrs:
            values.append(f"{name}:={self._attr(element, scope, 'value')}")
        for child in element.children:
            self._check(child, scope)
            if child.tag != "param":
                raise LaunchError(f"{self._where(child, scope)}: not allowed inside <param>")
            self._param(child, scope, name + ".", files, values)


def _join_namespace(outer: str, inner: str) -> str:
    """launch_ros: an absolute node namespace replaces the pushed one, a relative one is appended."""
    if inner.startswith("/"):
        return inner.rstrip("/") or "/"
    parts = [p for p in (outer.strip("/"), inner.strip("/")) if p]
    return "/" + "/".join(parts) if parts else ""


# --------------------------------------------------------------------------------------------------
# Running the node processes


def _die_with_parent() -> None:
    """Children get SIGTERM if robomosaic-launch itself is killed (Linux), so no node is orphaned."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stream(label: str, pipe, lock: threading.Lock) -> None:
    for raw in iter(pipe.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with lock:
            print(f"[{label}] {line}", flush=True)
    pipe.close()


def _say(lock: threading.Lock, text: str) -> None:
    with lock:
        print(f"[robomosaic-launch] {text}", flush=True)


def run_nodes(nodes: list[NodeSpec], sigterm_timeout: float = 5.0, sigkill_timeout: float = 5.0) -> int:
    """Start every node, stream output, and stop them all on a signal or a required node's exit."""
    lock = threading.Lock()
    requested: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, _: requested.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    processes: list[subprocess.Popen] = []
    try:
        for node in nodes:
            env = {**os.environ, "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1"), **node.env}
            process = subprocess.Popen(
                node.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                # the launcher alone signals its children (a terminal's Ctrl-C must not reach them twice)
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            processes.append(process)
            _say(lock, f"started {node.label} [pid {process.pid}]: {shlex.join(node.command)}")
        readers = [
            threading.Thread(target=_stream, args=(n.label, p.stdout, lock), daemon=True)
            for n, p in zip(nodes, processes, strict=True)
        ]
        for reader in readers:
            reader.start()
        status = _supervise(nodes, processes, requested, lock)
        killed = _stop(nodes, processes, sigterm_timeout, sigkill_timeout, requested, lock)
        for reader in readers:
            reader.join(timeout=2.0)
        return 1 if killed and status == 0 else status
    finally:
        for process in processes:  # only reached with live children on an exception above
            if process.poll() is None:
                process.kill()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _supervise(nodes: list[NodeSpec], processes: list[subprocess.Popen], requested: list[int], lock) -> int:
    reported: set[int] = set()
    while not requested:
        for i, (node, process) in enumerate(zip(nodes, processes, strict=True)):
            returncode = process.poll()
            if returncode is None or i in reported:
                continue
            reported.add(i)
            _say(lock, f"process {node.label} exited with status {returncode}")
            if node.required:
                _say(lock, f"{node.label} has on_exit=shutdown: shutting down the launch")
                return _exit_status(returncode)
        if len(reported) == len(processes):
            return 0 if all(p.returncode == 0 for p in processes) else 1
        time.sleep(0.05)
    _say(lock, f"signal {signal.Signals(requested[0]).name} received: shutting down")
    return 0


def _stop(
    nodes: list[NodeSpec],
    processes: list[subprocess.Popen],
    sigterm_timeout: float,
    sigkill_timeout: float,
    requested: list[int],
    lock: threading.Lock,
) -> bool:
    """SIGINT, then SIGTERM, then SIGKILL (at once on a second Ctrl-C). True if one needed SIGKILL."""
    signals_seen = len(requested)

    def wait(deadline: float) -> bool:
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in processes) or len(requested) > max(signals_seen, 1):
                break
            time.sleep(0.05)
        return all(p.poll() is not None for p in processes)

    steps: list[tuple[int, float]] = [(signal.SIGINT, sigterm_timeout), (signal.SIGTERM, sigkill_timeout)]
    for signum, timeout in steps:
        for node, process in zip(nodes, processes, strict=True):
            if process.poll() is None:
                _say(lock, f"sending {signal.Signals(signum).name} to {node.label}")
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)
        if wait(time.monotonic() + timeout):
            return False
    for node, process in zip(nodes, processes, strict=True):
        if process.poll() is None:
            _say(lock, f"{node.label} did not stop: SIGKILL")
            process.kill()
            process.wait()
    return True


# --------------------------------------------------------------------------------------------------
# Command line


def parse_launch_arguments(tokens: list[str]) -> dict[str, str]:
    arguments = {}
    for token in tokens:
        name, sep, value = token.partition(":=")
        if not sep or not name:
            raise LaunchError(f"launch arguments are name:=value, got {token!r}")
        arguments[name] = value
    return arguments


def load(file: str, arguments: dict[str, str], lenient: bool = False) -> Launcher:
    launcher = Launcher(arguments, lenient=lenient)
    path = find_launch_file(file)
    launcher.run_file(path)
    declared = {d.name for d in launcher.declared}
    unused = sorted(set(arguments) - declared - set(GLOBAL_CONFIGURATIONS))
    if unused and not lenient:
        print(
            f"[robomosaic-launch] warning: {path.name} declares no argument(s) {', '.join(unused)} "
            f"(declared: {', '.join(sorted(declared))})",
            file=sys.stderr,
        )
    return launcher


def _show_args(launcher: Launcher) -> str:
    lines = ["Arguments (pass arguments as '<name>:=<value>'):", ""]
    seen: set[str] = set()
    for arg in launcher.declared:
        if arg.name in seen:
            continue
        seen.add(arg.name)
        lines.append(f"    '{arg.name}':")
        lines.append(f"        {arg.description or 'no description given'}")
        lines.append(
            f"        (default: {arg.default!r})" if arg.default is not None else "        (required)"
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="robomosaic-launch",
        description="Run a robomosaic ROS 2 XML launch file (as `ros2 launch robomosaic <file>` does).",
    )
    parser.add_argument("file", help="a launch file name in share/robomosaic/launch (or a path)")
    parser.add_argument("arguments", nargs="*", help="launch arguments name:=value")
    parser.add_argument("-s", "--show-args", action="store_true", help="list the launch arguments")
    parser.add_argument("-p", "--print", action="store_true", help="print the node commands, run nothing")
    args = parser.parse_args(argv)
    tokens = list(args.arguments)
    if args.file == PACKAGE and tokens and ":=" not in tokens[0]:  # `robomosaic-launch robomosaic <file>`
        args.file = tokens.pop(0)
    try:
        arguments = parse_launch_arguments(tokens)
        launcher = load(args.file, arguments, lenient=args.show_args)
    except LaunchError as e:
        sys.exit(f"robomosaic-launch: error: {e}")
    if args.show_args:
        print(_show_args(launcher))
        return
    if args.print:
        for node in launcher.nodes:
            required = "  (on_exit=shutdown)" if node.required else ""
            env = "".join(f"{k}={shlex.quote(v)} " for k, v in node.env.items())
            print(f"[{node.label}]{required}\n  {env}{shlex.join(node.command)}")
        return
    config = {**GLOBAL_CONFIGURATIONS, **arguments}
    status = run_nodes(launcher.nodes, float(config["sigterm_timeout"]), float(config["sigkill_timeout"]))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
