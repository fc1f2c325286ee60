"""Worker process for tests/core/test_model_file_faults.py: writers that are killed, that hit a
file-size limit, and concurrent readers and a writer, all on one model file.

It imports torch and fastad once, then answers one JSON command per line on stdin with one JSON
line on stdout. Each fault runs in a child forked from it (importing torch costs seconds, a fork
milliseconds): a writer the test kills with SIGKILL, a writer under RLIMIT_FSIZE, readers and a
writer running side by side. The worker itself never computes with torch before forking (no
thread pools to inherit), and it reaps every child before answering, so that a killed writer's
pid is free again when the test looks for its leftovers.

Commands: {"op": "setup", "a": path, "b": path, "named": bool}, {"op": "kill", "target": path},
{"op": "fsize", "target": path, "limit": bytes}, {"op": "concurrent", "target": path, "seconds": s,
"readers": n, "min_loads": n, "min_saves": n, "overtime": s}, {"op": "quit"}.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import pickle
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.toy_method

import torch  # noqa: E402

from fastad import io as model_io  # noqa: E402
from fastad.methods import AnomalyModel  # noqa: E402
from tests.toy_method import ToyMean  # noqa: E402,F401  (registers "toy-mean")


def _no_unpickling(*args, **kwargs):
    raise AssertionError("a model file was unpickled")


pickle.load = pickle.loads = torch.load = _no_unpickling  # nothing here may unpickle

MODELS: dict[str, AnomalyModel] = {}
FILES: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}


def _reply(**data) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def _fork(body) -> tuple[int, int]:
    """A child running ``body(write)``; ``write(dict)`` sends its result up a pipe. Returns the
    child's pid and the pipe's reading end."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the worker's loop
        code = 0
        try:
            os.close(r)
            torch.set_num_threads(1)

            def write(data: dict) -> None:
                os.write(w, (json.dumps(data) + "\n").encode())

            body(write)
        except BaseException:
            code = 1
            with __import__("contextlib").suppress(Exception):
                os.write(w, (json.dumps({"crash": traceback.format_exc()}) + "\n").encode())
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid: int, r: int) -> tuple[dict, int]:
    """The child's last result line and its wait status (after reaping it)."""
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    lines = b"".join(chunks).decode().splitlines()
    return (json.loads(lines[-1]) if lines else {}), status


def setup(cmd: dict) -> None:
    model_io._USE_O_TMPFILE = not cmd["named"]
    for key in ("a", "b"):
        MODELS[key] = AnomalyModel.load(cmd[key])
        FILES[key] = model_io.load_model_file(cmd[key])
    scratch = Path(cmd["b"]).with_name("timing.safetensors")
    start = time.perf_counter()
    for _ in range(3):
        MODELS["b"].save(scratch)
    seconds = (time.perf_counter() - start) / 3
    scratch.unlink()
    _reply(save_s=seconds)


def kill(cmd: dict) -> None:
    """A child saving model B over ``target`` again and again until the test kills it."""
    target = cmd["target"]

    def body(write):
        while True:
            MODELS["b"].save(target)

    pid, r = _fork(body)
    _reply(pid=pid)
    result, status = _collect(pid, r)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    _reply(killed=killed, status=status, result=result)


def fsize(cmd: dict) -> None:
    """A child saving model B over ``target`` with files limited to ``limit`` bytes (writes past
    it fail with EFBIG, as on a full disk)."""

    def body(write):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (cmd["limit"], cmd["limit"]))
        try:
            MODELS["b"].save(cmd["target"])
        except Exception as exc:
            write(
                {
                    "raised": type(exc).__name__,
                    "is_oserror": isinstance(exc, OSError),
                    "errno": getattr(exc, "errno", None),
                    "message": str(exc),
                }
            )
        else:
            write({"raised": None})

    _reply(**_collect(*_fork(body))[0])


def _same(tensors: dict[str, torch.Tensor], header: dict, key: str) -> bool:
    want_tensors, want_header = FILES[key]
    return (
        header == want_header
        and tensors.keys() == want_tensors.keys()
        and all(torch.equal(tensors[n], want_tensors[n]) for n in tensors)
    )


def _same_model(model: AnomalyModel, key: str) -> bool:
    want = MODELS[key]
    return (
        type(model) is type(want)
        and model.get_params() == want.get_params()
        and all(model.__dict__.get(n) == want.__dict__.get(n) for n in ("spread_", "threshold_", "n_train_images_"))
        and all(torch.equal(getattr(model, n), getattr(want, n)) for n in ("mean_", "bank_"))
    )


def concurrent(cmd: dict) -> None:
    """``readers`` children loading the model file and predicting with it, and one child
    overwriting it with A and B in turn; each reader checks every model it loads is exactly A or
    B (tensors, header and predictions). They run for ``seconds``, and on until each reader has
    loaded ``min_loads`` times and seen both models and the writer has saved ``min_saves`` times
    (a loaded machine gets there late, not never), but no more than ``overtime`` seconds longer."""
    target, seconds = cmd["target"], cmd["seconds"]
    start_at = time.time() + 0.5  # all children start together, after the forks
    deadline = start_at + seconds + cmd["overtime"]
    readers_done = mmap.mmap(-1, cmd["readers"])  # anonymous and shared: one flag per reader, seen across the forks

    def running(count: int, minimum: int, more: bool = False) -> bool:
        now = time.time()
        return now < deadline and (now < start_at + seconds or count < minimum or more)

    def writer(write):
        while time.time() < start_at:
            time.sleep(0.001)
        saves = 0
        while running(saves, cmd["min_saves"], more=0 in readers_done[:]):
            MODELS["ab"[saves % 2]].save(target)
            saves += 1
        write({"saves": saves})

    def reader(index: int, write):
        images = torch.Generator().manual_seed(7)
        x = torch.rand(2, 3, 32, 32, generator=images)
        expected = {key: MODELS[key].predict(x) for key in "ab"}
        while time.time() < start_at:
            time.sleep(0.001)
        seen = {"a": 0, "b": 0}
        bad: list[str] = []
        loads = 0
        while running(loads, cmd["min_loads"], more=0 in seen.values()):
            loads += 1
            try:
                # the file as the reader sees it, and (read again) as a model: each must be A or B
                tensors, header = model_io.load_model_file(target)
                in_file = [k for k in "ab" if _same(tensors, header, k)]
                model = AnomalyModel.load(target)
                p = model.predict(x)
                as_model = [k for k in "ab" if _same_model(model, k)]
                if len(in_file) != 1 or len(as_model) != 1:
                    bad.append(
                        f"load {loads}: the file matches {in_file or 'neither A nor B'}, "
                        f"the model {as_model or 'neither A nor B'}"
                    )
                elif not (
                    torch.equal(p.scores, expected[as_model[0]].scores)
                    and torch.equal(p.maps, expected[as_model[0]].maps)
                ):
                    bad.append(f"load {loads}: predictions differ from model {as_model[0]}'s")
                else:
                    seen[as_model[0]] += 1
            except Exception as exc:
                bad.append(f"load {loads}: {type(exc).__name__}: {exc}")
        readers_done[index] = 1
        write({"loads": loads, "seen": seen, "bad": bad[:10], "n_bad": len(bad)})

    children = [_fork(writer)] + [_fork(functools.partial(reader, i)) for i in range(cmd["readers"])]
    results = [_collect(pid, r) for pid, r in children]
    _reply(writer=results[0][0], readers=[res for res, _ in results[1:]], statuses=[status for _, status in results])


def main() -> None:
    _reply(ready=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            {"setup": setup, "kill": kill, "fsize": fsize, "concurrent": concurrent}[cmd["op"]](cmd)
        except Exception:
            _reply(error=traceback.format_exc())


if __name__ == "__main__":
    main()
