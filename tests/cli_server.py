"""`python -m llmtune ARGS` for the tests, without paying Python's imports on every call.

Most of a test command's CPU time is importing torch, Lightning, transformers and PEFT (about 11 s of a 16 s refusal
of a bad path on the CI machine), and the suite runs a few hundred commands. A server process imports them once; each
command is then a fork of it that runs the real `llmtune/__main__.py` (runpy, as `python -m` does), with its own working
directory, environment, stdin and captured stdout/stderr, and exits with the command's exit code. What differs from a
fresh interpreter is only what those libraries read from the environment at import time, so one server is kept per
environment (a few at most; past that, a command runs as a plain subprocess).

The server reads one JSON request per line on stdin and answers on stdout: {"id", "pid"} when the command started,
{"id", "returncode"} when it ended.
"""

import atexit
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

# What the commands import; the llmtune modules bring torch, Lightning, transformers, PEFT, datasets and Hydra.
PRELOAD = ("llmtune.job", "llmtune.run", "llmtune.training.module", "llmtune.training.strategies", "llmtune.methods",
           "llmtune.models.sources", "llmtune.tasks.classification", "llmtune.tasks.qa", "llmtune.rag.retrievers",
           "llmtune.multirun", "llmtune.tracking", "llmtune.predict", "llmtune.export.cli", "llmtune.report.compare",
           "llmtune.evaluation.metrics", "llmtune.serve", "peft", "transformers.optimization")
MAX_SERVERS = 4
# Variables that differ between commands of one environment and that no library reads at import: a server is shared
# across them (each command still gets its own value).
PER_TEST = {"PYTEST_CURRENT_TEST"}


# --- The server (this file run as a script) --------------------------------------------------------------------------

def serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    requests, answers = sys.stdin.fileno(), sys.stdout.fileno()
    running: dict[int, str] = {}
    pending, open_ = b"", True
    while open_ or running:
        if open_ and select.select([requests], [], [], 0.02)[0]:
            chunk = os.read(requests, 65536)
            open_ = bool(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in filter(None, lines):
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    run_command(request)  # never returns
                running[pid] = request["id"]
                os.write(answers, (json.dumps({"id": request["id"], "pid": pid}) + "\n").encode())
        elif not open_:
            select.select([], [], [], 0.02)
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                answer = {"id": running.pop(pid), "returncode": os.waitstatus_to_exitcode(status)}
                os.write(answers, (json.dumps(answer) + "\n").encode())


def run_command(request: dict) -> None:
    """In the forked child: become `python -m llmtune ARGS` and exit with its code."""
    import runpy
    import traceback

    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, request["stdin"], os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        # Fresh streams on the new descriptors, buffered as a non-interactive Python's are.
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - the process's own streams until it exits
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)  # noqa: SIM115
        sys.argv = ["llmtune", *request["args"]]
        try:
            runpy.run_module("llmtune", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as the interpreter does: the traceback on stderr, exit 1
            traceback.print_exc()
        atexit._run_exitfuncs()  # what the interpreter runs on the way out: logging's flush, library finalisers
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


# --- The client (imported by the tests) ------------------------------------------------------------------------------

class Server:
    def __init__(self, env: dict, log: Path):
        self.log = log  # the server's own stderr (its imports' warnings); kept only if it fails
        with open(log, "ab") as stderr:
            self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, env=env, cwd=tempfile.gettempdir())
        self.lock = threading.Lock()
        self.started: dict[str, Future] = {}
        self.ended: dict[str, Future] = {}
        self.count = 0
        threading.Thread(target=self._read_answers, daemon=True).start()

    def _read_answers(self) -> None:
        for line in self.process.stdout:
            answer = json.loads(line)
            with self.lock:
                if "pid" in answer:
                    self.started.pop(answer["id"]).set_result(answer["pid"])
                else:
                    self.ended.pop(answer["id"]).set_result(answer["returncode"])
        with self.lock:  # the server died: every command still waiting fails rather than hangs
            for future in [*self.started.values(), *self.ended.values()]:
                future.set_exception(RuntimeError("the test command server ended"))

    def run(self, args: list[str], cwd: Path, env: dict, stdin: str | None, timeout: float):
        with tempfile.TemporaryDirectory(prefix="llmtune-cli-") as scratch:
            files = {name: str(Path(scratch) / name) for name in ("stdin", "stdout", "stderr")}
            Path(files["stdin"]).write_text(stdin or "", encoding="utf-8")
            with self.lock:
                self.count += 1
                key = str(self.count)
                started = self.started[key] = Future()
                ended = self.ended[key] = Future()
                request = {"id": key, "args": list(args), "cwd": str(cwd), "env": env, **files}
                self.process.stdin.write((json.dumps(request) + "\n").encode())
                self.process.stdin.flush()
            pid = started.result(timeout=60)
            try:
                returncode = ended.result(timeout=timeout)
            except TimeoutError:
                os.kill(pid, 9)
                ended.result(timeout=60)
                raise subprocess.TimeoutExpired(["llmtune", *args], timeout) from None
            read = lambda name: Path(files[name]).read_text(encoding="utf-8", errors="backslashreplace")
            return subprocess.CompletedProcess(["llmtune", *args], returncode, read("stdout"), read("stderr"))

    def close(self) -> None:
        self.process.stdin.close()
        if self.process.wait(timeout=600) == 0:
            self.log.unlink(missing_ok=True)


_servers: dict[frozenset, Server] = {}
_servers_lock = threading.Lock()


def run_llmtune_in(cwd: Path, args: list[str], env: dict, stdin: str | None = None,
                   timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m llmtune ARGS` in `cwd` with exactly `env` (text stdout/stderr captured), as subprocess.run gives it."""
    key = frozenset((name, value) for name, value in env.items() if name not in PER_TEST)
    with _servers_lock:
        server = _servers.get(key)
        if server is None and len(_servers) < MAX_SERVERS:
            log = Path(tempfile.gettempdir()) / f"llmtune-cli-server-{os.getpid()}-{len(_servers)}.log"
            server = _servers[key] = Server(env, log)
    if server is None:
        return subprocess.run([sys.executable, "-m", "llmtune", *args], input=stdin, capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=timeout, check=False)
    return server.run(args, cwd, env, stdin, timeout)


@atexit.register
def _close_servers() -> None:
    for server in _servers.values():
        server.close()


if __name__ == "__main__":
    serve()
