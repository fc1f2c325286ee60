"""Model files under faults: damaged and edited files, writers killed half-way, a full disk, and
readers racing a writer (fastad.io, through AnomalyModel.save/load and the Siamese detector).

What must hold: a damaged or edited file is refused with a ModelFileError that names it and says
what is wrong, and nothing is unpickled; a write that is killed or fails leaves the old file or
the new one whole, and no temporary file; a reader never sees a torn model.

Killed writers, the size limit and the concurrent readers run in children forked from one worker
process (tests/core/model_file_worker.py), which imports torch once. FASTAD_HYPOTHESIS=long runs
more kill trials and a longer race, as it runs more Hypothesis examples.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import secrets
import select
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastad import estimator as fastad_estimator
from fastad import io as model_io
from fastad.io import ModelFileError
from fastad.methods import AnomalyModel

from ..toy_method import ToyMean

pytestmark = pytest.mark.faults

LONG = os.environ.get("FASTAD_HYPOTHESIS") == "long"
KILL_TRIALS = 300 if LONG else 30  # per temporary-file mode (unnamed O_TMPFILE, named fallback)
RACE_SECONDS = 10.0 if LONG else 2.5
READERS = 2
# What a race must have done to count, however slow the machine: each reader loads this often
# and sees both models, the writer saves this often; the race runs on (RACE_OVERTIME at most)
# until they have, rather than failing a busy machine after RACE_SECONDS.
MIN_LOADS, MIN_SAVES, RACE_OVERTIME = 10, 4, 60.0
FSIZE_LIMITS = ("zero", 64, "half", "all-but-one")  # bytes a file may have; past them writes fail

LINUX = sys.platform.startswith("linux")
needs_linux = pytest.mark.skipif(not LINUX, reason="fork, RLIMIT_FSIZE and O_TMPFILE are Linux facilities")
WORKER = Path(__file__).with_name("model_file_worker.py")
ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# Nothing may unpickle


class Unpickled(BaseException):
    """Raised by the guards below: a BaseException, so no ``except Exception`` can hide it."""


@pytest.fixture(scope="module", autouse=True)
def unpickled():
    """Every unpickling entry point refuses (and is recorded) while this module runs."""
    calls: list[str] = []

    def guard(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise Unpickled(f"{name} was called while reading a model file")

        return refuse

    with pytest.MonkeyPatch.context() as mp:
        for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
            mp.setattr(owner, name, guard(f"{owner.__name__}.{name}"))
        yield calls
    assert not calls, f"unpickling was attempted: {calls}"


def test_the_unpickling_guard_is_live(unpickled):
    with pytest.raises(Unpickled):
        pickle.loads(pickle.dumps(1))
    with pytest.raises(Unpickled):
        torch.load("x")
    assert unpickled == ["pickle.loads", "torch.load"]
    unpickled.clear()


# ----------------------------------------------------------------------------------------------
# Models and files


def _fit(seed: int, bank: int, cls=ToyMean, **params) -> ToyMean:
    gen = torch.Generator().manual_seed(seed)
    model = cls(holdout=0.25, **params).fit(torch.rand(8, 3, 32, 32, generator=gen))
    model.bank_ = torch.randn(bank, generator=gen)  # a learned tensor ToyMean carries along
    return model


class Files(SimpleNamespace):
    def __repr__(self) -> str:  # what Hypothesis prints with a failing example
        return f"<model files, seed {self.seed}>"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``toy``: a small model (a 1.2 KB header, 4.2 KB of tensors) for damaged-file cases; ``a``
    and ``b``: two models of 2 MB and 3 MB for the writers; each saved, with its bytes and its
    (tensors, header)."""
    seed = secrets.randbelow(2**31 - 1)
    print(f"model seed: {seed}")
    folder = tmp_path_factory.mktemp("sources")
    out = Files(folder=folder, seed=seed)
    for key, bank, params in (("toy", 1024, {}), ("a", 512 * 1024, {}), ("b", 768 * 1024, {"pool": 4})):
        model = _fit(seed + len(key) * 7 + ord(key[0]), bank, **params)
        path = model.save(folder / f"{key}.safetensors")
        setattr(
            out,
            key,
            SimpleNamespace(model=model, path=path, data=path.read_bytes(), file=model_io.load_model_file(path)),
        )
    assert out.a.data != out.b.data
    return out


def same_file(loaded, expected) -> bool:
    """Two (tensors, header) pairs are equal: same header, same names, equal tensors."""
    (tensors, header), (want_tensors, want_header) = loaded, expected
    return (
        header == want_header
        and tensors.keys() == want_tensors.keys()
        and all(t.dtype == want_tensors[n].dtype and torch.equal(t, want_tensors[n]) for n, t in tensors.items())
    )


def refused(path: Path, *reasons: str, damaged: bool = True) -> str:
    """Loading ``path`` raises a ModelFileError naming it and giving one of ``reasons``, through
    AnomalyModel.load and, for a ``damaged`` file, the model-file reader too; returns the message."""
    with pytest.raises(ModelFileError) as info:
        AnomalyModel.load(path)
    message = str(info.value)
    assert str(path) in message, message
    assert any(reason in message for reason in reasons), message
    if damaged:
        with pytest.raises(ModelFileError):
            model_io.load_model_file(path)
    return message


def split(data: bytes) -> tuple[dict, bytes, int]:
    """A safetensors file's header (parsed), its tensor bytes and its header's length."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :], n


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def relayout(header: dict, body: bytes, specs: dict[str, tuple[str, list[int]]]) -> bytes:
    """A new safetensors file where tensor ``name`` has dtype and shape ``specs[name]`` (its
    bytes kept, or cut to the new size), every offset recomputed so that safetensors parses it."""
    sizes = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I64": 8}
    new_header, parts, offset = {"__metadata__": header["__metadata__"]}, [], 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype, shape = specs.get(name, (info["dtype"], info["shape"]))
        size = sizes[dtype] * int(np.prod(shape, dtype=np.int64))
        assert size <= end - start, f"{name}: the new layout needs more bytes than the tensor has"
        parts.append(body[start : start + size])
        new_header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return join(new_header, b"".join(parts))


def forge(src: Path, dst: Path, edit_header=None, edit_tensors=None, *, text_edit=None) -> Path:
    """``src`` with an edited header or tensors and the digest recomputed over the edit: a file
    that is consistent but wrong. safetensors' own writer makes it (an independent writer)."""
    from safetensors.torch import save_file

    tensors, header = model_io.load_model_file(src)
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    header["digest"] = model_io.tensor_digest(tensors, header)
    text = json.dumps(header, sort_keys=True)
    if text_edit:
        text = text_edit(text)
    save_file(tensors, str(dst), metadata={"fastad": text})
    return dst


def leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


@pytest.fixture(params=[False, True], ids=["unnamed", "named"])
def named(request, monkeypatch):
    """Both ways of writing: an unnamed O_TMPFILE inode (Linux), and the named-temporary
    fallback that other systems and file systems get."""
    if not request.param and not (LINUX and hasattr(os, "O_TMPFILE")):
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(model_io, "_USE_O_TMPFILE", not request.param)
    return request.param


# ----------------------------------------------------------------------------------------------
# Fault-free baseline: the writer's files are what safetensors reads, with an ordinary mode


def test_round_trip_file_mode_and_format(files, tmp_path, named):
    from safetensors import safe_open

    path = files.toy.model.save(tmp_path / "m.safetensors")
    assert path.read_bytes() == files.toy.data  # the same bytes in both modes
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert leftovers(tmp_path, "m.safetensors") == []
    with safe_open(str(path), framework="pt") as f:  # safetensors itself reads what we wrote
        assert json.loads(f.metadata()["fastad"]) == files.toy.file[1]
        assert all(torch.equal(f.get_tensor(n), t) for n, t in files.toy.file[0].items())
    loaded = AnomalyModel.load(path)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(files.seed))
    want = files.toy.model.predict(x)
    got = loaded.predict(x)
    assert torch.equal(got.scores, want.scores) and torch.equal(got.maps, want.maps)
    assert got.threshold == want.threshold is not None


# ----------------------------------------------------------------------------------------------
# 1. Damaged files


@pytest.mark.parametrize("sixteenths", range(16))
def test_truncated_files_are_refused(files, tmp_path, sixteenths):
    data = files.toy.data
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) * sixteenths // 16])
    refused(path, "truncated")


def _header_positions(data: bytes) -> dict[str, int]:
    """Named places in the safetensors header of ``data``: the length, the JSON's structure,
    the fastad document inside it, a tensor's dtype, shape and offsets, the padding."""
    _, _, n = split(data)
    text = data[8 : 8 + n]

    def at(token: bytes, shift: int = 0) -> int:
        i = text.find(token)
        assert i >= 0, token
        return 8 + i + shift

    return {
        "length-low-byte": 0,
        "length-high-byte": 7,
        "json-open": 8,
        "metadata-key": at(b'"__metadata__"', 3),
        "digest-value": at(b"digest", 14),
        "method-name": at(b"toy-mean", 2),
        "param-pool": at(b"pool", 8),
        "state-spread": at(b"spread_", 12),
        "dtype": at(b'"F32"', 1),
        "shape-digit": at(b'"shape":[', 9),
        "offsets-digit": at(b'"data_offsets":[', 17),
        "tensor-name": at(b'"bank_"', 2),
        "middle": 8 + n // 2,
        "last-byte": 8 + n - 1,
    }


@pytest.mark.parametrize("mask", [0x01, 0x10, 0x80], ids=["bit0", "bit4", "bit7"])
def test_flipped_header_bytes_are_refused(files, tmp_path, mask):
    data = files.toy.data
    for where, i in _header_positions(data).items():
        damaged = bytearray(data)
        damaged[i] ^= mask
        path = tmp_path / f"{where}.safetensors"
        path.write_bytes(bytes(damaged))
        refused(
            path,
            "not a readable model file",
            "truncated",
            "checksum",
            "not valid JSON",
            "not a fastad model",
            "does not describe a fastad model",
            "damaged or edited",
        )


@pytest.mark.parametrize("position", [0.0, 0.25, 0.5, 0.999])
def test_flipped_tensor_bytes_are_refused(files, tmp_path, position):
    data = files.toy.data
    _, body, n = split(data)
    damaged = bytearray(data)
    damaged[8 + n + int(position * len(body))] ^= 0xFF
    path = tmp_path / "flip.safetensors"
    path.write_bytes(bytes(damaged))
    refused(path, "checksum")


@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7), in_header=st.booleans())
def test_any_flipped_bit_is_refused(files, where, bit, in_header):
    data = files.toy.data
    _, body, n = split(data)
    i = int(where * (8 + n)) if in_header else 8 + n + int(where * len(body))
    damaged = bytearray(data)
    damaged[i] ^= 1 << bit
    path = files.folder / "flipped.safetensors"
    path.write_bytes(bytes(damaged))
    refused(
        path,
        "not a readable model file",
        "truncated",
        "checksum",
        "not valid JSON",
        "not a fastad model",
        "does not describe a fastad model",
        "damaged or edited",
    )


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda h: h["params"].update(pool=4), id="param"),
        pytest.param(lambda h: h["state"].update(spread_=h["state"]["spread_"] * 2), id="learned-value"),
        pytest.param(lambda h: h["state"].update(threshold_=None), id="threshold"),
        pytest.param(lambda h: h.update(method="no-such-method"), id="method"),
        pytest.param(lambda h: h.update(fastad_version="0.0.0"), id="version"),
        pytest.param(lambda h: h.pop("digest"), id="no-digest"),
    ],
)
def test_edited_header_without_its_digest_is_refused(files, tmp_path, edit):
    header, body, _ = split(files.toy.data)
    document = json.loads(header["__metadata__"]["fastad"])
    edit(document)
    header["__metadata__"]["fastad"] = json.dumps(document, sort_keys=True)
    path = tmp_path / "edited.safetensors"
    path.write_bytes(join(header, body))
    refused(path, "checksum")


@pytest.mark.parametrize(
    "tensor, dtype, shape",
    [
        ("mean_", "I32", [3, 4, 4]),  # same bytes read as integers
        ("mean_", "F16", [3, 4, 8]),  # same bytes, half the width, twice the elements
        ("mean_", "F64", [3, 4, 2]),
        ("mean_", "F32", [3, 16]),  # same values, another shape
        ("mean_", "F32", [4, 3, 4]),
        ("mean_", "F32", [3, 4, 2]),  # fewer values (the rest cut from the file)
        ("bank_", "F32", [32, 32]),
        ("bank_", "BF16", [1024]),
    ],
)
def test_retyped_or_reshaped_tensors_are_refused(files, tmp_path, tensor, dtype, shape):
    from safetensors import safe_open

    header, body, _ = split(files.toy.data)
    path = tmp_path / "retyped.safetensors"
    path.write_bytes(relayout(header, body, {tensor: (dtype, shape)}))
    with safe_open(str(path), framework="pt") as f:  # safetensors itself accepts the file
        assert list(f.get_tensor(tensor).shape) == shape
    refused(path, "checksum")


# Consistent but wrong: the edit is made and the digest recomputed over it (what a careless tool
# or an attacker does). Loading must stop with the field named, not return a model that fails later.
FORGED = [
    ("unknown-method", lambda h: h.update(method="no-such-method"), None, "no-such-method"),
    ("negative-batch-size", lambda h: h["params"].update(batch_size=-1), None, "batch_size"),
    ("batch-size-text", lambda h: h["params"].update(batch_size="32"), None, "batch_size"),
    ("holdout-out-of-range", lambda h: h["params"].update(holdout=3.0), None, "holdout"),
    ("negative-blur", lambda h: h["params"].update(blur_sigma=-1.0), None, "blur_sigma"),
    ("blur-text", lambda h: h["params"].update(blur_sigma="4"), None, "blur_sigma"),
    ("holdout-text", lambda h: h["params"].update(holdout="0.1"), None, "holdout"),
    ("unknown-upsampling", lambda h: h["params"].update(upsample_mode="cubic-spline"), None, "upsample_mode"),
    ("zero-quantile", lambda h: h["params"].update(threshold_quantile=0.0), None, "threshold_quantile"),
    ("bad-device", lambda h: h["params"].update(device="no-such-device"), None, "device"),
    ("unknown-parameter", lambda h: h["params"].update(colour="red"), None, "colour"),
    ("params-not-a-dict", lambda h: h.update(params=[1, 2]), None, "'params'"),
    ("state-not-a-dict", lambda h: h.update(state="mean_"), None, "'state'"),
    ("rebuild-malformed", lambda h: h.update(rebuild={"numpy_arrays": "bank_"}), None, "'rebuild'"),
    ("negative-image-count", lambda h: h["state"].update(n_train_images_=-5), None, "n_train_images_"),
    ("no-image-count", lambda h: h["state"].pop("n_train_images_"), None, "n_train_images_"),
    ("threshold-text", lambda h: h["state"].update(threshold_="high"), None, "threshold_"),
    ("private-attribute", lambda h: h["state"].update(_cache_=1), None, "learned attribute"),
    ("stray-tensor", None, lambda t: t.update({"x.y": torch.zeros(2)}), "x.y"),
    (
        "tensor-as-count",
        lambda h: h["state"].pop("n_train_images_"),
        lambda t: t.update(n_train_images_=torch.tensor([8])),
        "n_train_images_",
    ),
]


@pytest.mark.parametrize(
    "edit_header, edit_tensors, named_field", [pytest.param(*case[1:], id=case[0]) for case in FORGED]
)
def test_consistent_but_wrong_files_are_refused(files, tmp_path, edit_header, edit_tensors, named_field):
    path = forge(files.toy.path, tmp_path / "forged.safetensors", edit_header, edit_tensors)
    message = refused(path, named_field, damaged=False)
    assert "checksum" not in message  # the digest matched: the content itself was checked


@pytest.mark.parametrize(
    "text_edit, what",
    [
        (lambda s: s.replace('"blur_sigma": 4.0', '"blur_sigma": NaN'), "NaN"),
        (lambda s: s.replace('"blur_sigma": 4.0', '"blur_sigma": Infinity'), "Infinity"),
        (lambda s: s.replace('"blur_sigma": 4.0', '"blur_sigma": 1e999'), "1e999"),
    ],
    ids=["nan", "infinity", "overflow"],
)
def test_non_finite_numbers_in_a_header_are_refused(files, tmp_path, text_edit, what):
    """fastad writes finite JSON numbers only; Python's json would read these as nan and inf."""
    path = forge(files.toy.path, tmp_path / "forged.safetensors", text_edit=text_edit)
    assert what in split(path.read_bytes())[0]["__metadata__"]["fastad"]
    refused(path, what)


class CheckedToy(ToyMean):
    """ToyMean with the state check a method writes (AnomalyModel._check_state): its learned
    tensors must fit its parameters."""

    method_name = "toy-mean-checked"

    def _check_state(self) -> None:
        super()._check_state()
        if not (
            isinstance(self.mean_, torch.Tensor)
            and self.mean_.dtype == torch.float32
            and self.mean_.dim() == 3
            and self.mean_.shape[0] == 3
        ):
            raise ValueError(
                f"mean_ must be a float32 (3, h, w) tensor, got {getattr(self.mean_, 'shape', self.mean_)!r}"
            )
        if not (isinstance(self.spread_, float) and 0 < self.spread_ < float("inf")):
            raise ValueError(f"spread_ must be a positive float, got {self.spread_!r}")


@pytest.mark.parametrize(
    "edit_header, edit_tensors, named_field",
    [
        pytest.param(None, lambda t: t.update(mean_=torch.zeros(2, 4, 4)), "mean_", id="wrong-shape"),
        pytest.param(
            None, lambda t: t.update(mean_=torch.zeros(3, 4, 4, dtype=torch.float64)), "mean_", id="wrong-dtype"
        ),
        pytest.param(lambda h: h["state"].update(spread_=-1.0), None, "spread_", id="negative-spread"),
        pytest.param(lambda h: h["state"].update(spread_="wide"), None, "spread_", id="spread-text"),
    ],
)
def test_a_methods_state_check_runs_at_load(files, tmp_path, monkeypatch, edit_header, edit_tensors, named_field):
    monkeypatch.setitem(fastad_estimator._REGISTRY, CheckedToy.method_name, CheckedToy)
    model = _fit(files.seed, 16, CheckedToy)
    good = model.save(tmp_path / "good.safetensors")
    assert type(AnomalyModel.load(good)) is CheckedToy
    path = forge(good, tmp_path / "forged.safetensors", edit_header, edit_tensors)
    message = refused(path, named_field, damaged=False)
    assert "checksum" not in message


# ----------------------------------------------------------------------------------------------
# The worker: killed writers, a file-size limit, racing readers


class Worker:
    """tests/core/model_file_worker.py, spoken to in JSON lines (see its docstring)."""

    def __init__(self, log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", str(WORKER)],
                cwd=ROOT,
                bufsize=0,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self.buffer = b""
        assert self.read(timeout=180) == {"ready": True}

    def read(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"the worker did not answer in {timeout} s; its stderr:\n{self.stderr()}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the worker died ({self.proc.wait()}); its stderr:\n{self.stderr()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        reply = json.loads(line)
        assert "error" not in reply, reply["error"]
        return reply

    def send(self, **command) -> None:
        self.proc.stdin.write((json.dumps(command) + "\n").encode())

    def ask(self, timeout: float = 120.0, **command) -> dict:
        self.send(**command)
        return self.read(timeout)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            with __import__("contextlib").suppress(OSError):
                self.send(op="quit")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    if not LINUX:
        pytest.skip("the worker forks its writers (Linux)")
    w = Worker(tmp_path_factory.mktemp("worker") / "stderr.txt")
    yield w
    w.close()


@pytest.fixture
def target(files, tmp_path, named, worker):
    """A folder of its own holding model A at ``m.safetensors``, and the worker set to the same
    temporary-file mode as this process."""
    folder = tmp_path / "models"
    folder.mkdir()
    path = files.a.model.save(folder / "m.safetensors")
    assert path.read_bytes() == files.a.data
    reply = worker.ask(op="setup", a=str(files.a.path), b=str(files.b.path), named=named)
    return SimpleNamespace(path=path, folder=folder, save_s=reply["save_s"])


def _which(path: Path, files) -> str:
    """'a' or 'b': the file is byte for byte one of the two models, and loads as that model."""
    data = path.read_bytes()
    assert data in (files.a.data, files.b.data), f"{path} holds neither A nor B ({len(data)} bytes)"
    key = "a" if data == files.a.data else "b"
    assert same_file(model_io.load_model_file(path), getattr(files, key).file)
    return key


@needs_linux
def test_killed_writers_leave_the_old_or_the_new_file_whole_and_no_temporary(files, target, worker, named):
    rng = random.Random(files.seed)
    pattern = re.compile(r"\A\.m\.safetensors\.fastad-[0-9a-f]{8}-(\d+)-[0-9a-f]{12}\.tmp\Z")
    outcomes: Counter[str] = Counter()
    for trial in range(KILL_TRIALS):
        pid = worker.ask(op="kill", target=str(target.path))["pid"]
        time.sleep(rng.uniform(0.0, 3.0 * target.save_s))
        os.kill(pid, signal.SIGKILL)
        done = worker.read()
        assert done["killed"], f"trial {trial}: the writer was not killed but ended: {done}"
        outcomes[_which(target.path, files)] += 1
        left = leftovers(target.folder, "m.safetensors")
        # A kill between naming the new file and renaming it can leave a temporary: it must be
        # recognisable as the dead writer's, and the next save to the folder removes it.
        for name in left:
            match = pattern.match(name)
            assert match and int(match[1]) == pid, f"trial {trial}: unexpected file {name} in the folder"
        outcomes["leftover before the next save"] += len(left)
        files.a.model.save(target.path)  # the next save (also puts A back for the next trial)
        assert leftovers(target.folder, "m.safetensors") == [], f"trial {trial}"
    print(
        f"{KILL_TRIALS} kills, {'named' if named else 'unnamed'} temporaries, save {target.save_s * 1e3:.1f} ms:",
        dict(outcomes),
    )
    if named:
        # the fallback leaves temporaries whenever a kill lands mid-write: the sweep was exercised
        assert outcomes["leftover before the next save"] > 0 or KILL_TRIALS < 10


@needs_linux
@pytest.mark.parametrize("limit", FSIZE_LIMITS)
def test_a_full_disk_raises_a_clear_oserror_and_keeps_the_old_file(files, target, worker, limit):
    size = len(files.b.data)
    limit = {"zero": 0, "half": size // 2, "all-but-one": size - 1}.get(limit, limit)
    reply = worker.ask(op="fsize", target=str(target.path), limit=limit)
    assert reply.get("raised"), f"saving {size} bytes under a {limit}-byte limit did not fail: {reply}"
    assert reply["is_oserror"] and reply["errno"] == errno.EFBIG, reply
    message = reply["message"]
    assert str(target.path) in message and "File too large" in message and "disk is full" in message, message
    assert "/proc/" not in message and ".tmp" not in message, message
    assert _which(target.path, files) == "a"
    assert leftovers(target.folder, "m.safetensors") == []


@needs_linux
def test_readers_racing_a_writer_see_a_or_b_whole(files, target, worker):
    reply = worker.ask(
        op="concurrent",
        target=str(target.path),
        seconds=RACE_SECONDS,
        readers=READERS,
        min_loads=MIN_LOADS,
        min_saves=MIN_SAVES,
        overtime=RACE_OVERTIME,
        timeout=RACE_SECONDS + RACE_OVERTIME + 60,
    )
    assert reply["statuses"] == [0] * (1 + READERS), reply
    readers, saves = reply["readers"], reply["writer"]["saves"]
    print(f"race of {RACE_SECONDS} s: {saves} saves,", [(r["loads"], r["seen"]) for r in readers])
    for r in readers:
        assert r["n_bad"] == 0, r["bad"]
        assert r["loads"] >= MIN_LOADS and min(r["seen"].values()) > 0, r
    seen = Counter()
    for r in readers:
        seen.update(r["seen"])
    assert saves >= MIN_SAVES, (saves, seen)
    _which(target.path, files)
    assert leftovers(target.folder, "m.safetensors") == []


# ----------------------------------------------------------------------------------------------
# Failures injected in this process, at each step of a save


def _fail(monkeypatch, owner, name, err: int, after: int = 0):
    """``owner.name`` raises OSError(err) from its ``after``-th call on."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def _half_then_full(f, tensors, metadata):
    f.write(b"x" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("step", ["write", "fsync", "link", "replace"])
def test_a_failure_at_any_step_keeps_the_old_file_and_leaves_nothing(files, tmp_path, monkeypatch, named, step):
    path = files.a.model.save(tmp_path / "m.safetensors")
    if step == "link" and named:
        pytest.skip("the named fallback makes no link")
    err = {"write": errno.ENOSPC, "fsync": errno.EIO, "link": errno.ENOSPC, "replace": errno.EACCES}[step]
    if step == "write":
        monkeypatch.setattr(model_io, "_write_safetensors", _half_then_full)
        calls = None
    else:
        calls = _fail(monkeypatch, os, step, err)
    with pytest.raises(OSError) as info:
        files.b.model.save(path)
    assert calls is None or calls["n"] >= 1
    assert info.value.errno == err and str(path) in str(info.value) and os.strerror(err) in str(info.value)
    assert "/proc/" not in str(info.value)
    monkeypatch.undo()
    assert _which(path, files) == "a"
    assert leftovers(tmp_path, "m.safetensors") == []


def test_other_files_written_atomically(tmp_path, named):
    """The other users of atomic_path (JSON, PNG through PIL, .npy, text) get complete files
    with the usual mode, and a failing block leaves the old file and nothing else."""
    from fastad import viz

    umask = os.umask(0)
    os.umask(umask)
    model_io.write_json(tmp_path / "a.json", {"x": 1})
    viz.save_png(tmp_path / "b.png", np.zeros((4, 5, 3), np.uint8))
    viz.save_map_png(tmp_path / "c.png", np.linspace(0, 1, 20).reshape(4, 5), vmin=0, vmax=1)
    with model_io.atomic_path(tmp_path / "d.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.arange(6.0))
    with model_io.atomic_path(tmp_path / "e.txt") as tmp:
        tmp.write_text("hello")
    from PIL import Image

    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert Image.open(tmp_path / "b.png").size == (5, 4) and Image.open(tmp_path / "c.png").mode.startswith("I")
    assert np.load(tmp_path / "d.npy").tolist() == [0, 1, 2, 3, 4, 5]
    assert (tmp_path / "e.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png", "c.png", "d.npy", "e.txt"]
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o666 & ~umask}

    with pytest.raises(RuntimeError, match="boom"):
        with model_io.atomic_path(tmp_path / "e.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    with pytest.raises(OSError) as info:  # a writer failing on the temporary is reported on the target
        with model_io.atomic_path(tmp_path / "e.txt") as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    assert info.value.errno == errno.ENOSPC and str(tmp_path / "e.txt") in str(info.value)
    with pytest.raises(FileNotFoundError) as info:  # ... but an error about another file is left as it is
        with model_io.atomic_path(tmp_path / "e.txt") as tmp:
            open(tmp_path / "missing.txt")
    assert info.value.filename == str(tmp_path / "missing.txt")
    assert (tmp_path / "e.txt").read_text() == "hello"
    assert len(list(tmp_path.iterdir())) == 5


@needs_linux
def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(files, tmp_path, named):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = model_io._host_tag()
    names = {
        "dead": f".m.safetensors.fastad-{host}-{dead.pid}-{secrets.token_hex(6)}.tmp",
        "dead-other-target": f".x.json.fastad-{host}-{dead.pid}-{secrets.token_hex(6)}.tmp",
        "alive": f".m.safetensors.fastad-{host}-{os.getppid()}-{secrets.token_hex(6)}.tmp",
        "this-process": f".m.safetensors.fastad-{host}-{os.getpid()}-{secrets.token_hex(6)}.tmp",
        "other-host": (
            f".m.safetensors.fastad-{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead.pid}-{secrets.token_hex(6)}.tmp"
        ),
        "not-fastad": ".m.safetensors.k2j4h5.tmp",
        "not-fastad-either": f"m.safetensors.fastad-{host}-{dead.pid}-{secrets.token_hex(6)}.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / f".d.fastad-{host}-{dead.pid}-{secrets.token_hex(6)}.tmp").mkdir()  # a folder is left alone
    files.toy.model.save(tmp_path / "m.safetensors")
    present = {p.name for p in tmp_path.iterdir()}
    assert names["dead"] not in present and names["dead-other-target"] not in present
    assert {names[k] for k in ("alive", "this-process", "other-host", "not-fastad", "not-fastad-either")} <= present
    assert len(present) == 7


# ----------------------------------------------------------------------------------------------
# The Siamese detector's files go through the same reader and writer


def test_siamese_detector_files_use_the_same_checks(tmp_path, monkeypatch):
    from fastad.siamese.detector import PRETRAINED_PATH, SiameseDetector

    if not PRETRAINED_PATH.is_file():
        pytest.skip("the shipped Siamese weights are not installed")
    writes = []
    real = model_io._write_safetensors
    monkeypatch.setattr(model_io, "_write_safetensors", lambda *a: writes.append(1) or real(*a))
    shipped = SiameseDetector.pretrained()  # written by an earlier fastad through safetensors
    path = shipped.save(tmp_path / "s.safetensors")
    assert writes == [1]
    loaded = SiameseDetector.load(path)
    want = shipped.network_.state_dict()
    assert loaded.get_params() == shipped.get_params()
    assert all(torch.equal(t, want[n]) for n, t in loaded.network_.state_dict().items())

    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated") as info:
        SiameseDetector.load(cut)
    assert str(cut) in str(info.value)
    header, body, _ = split(data)
    name = next(n for n, v in header.items() if n != "__metadata__" and v["dtype"] == "F32" and len(v["shape"]) == 4)
    retyped = tmp_path / "retyped.safetensors"
    retyped.write_bytes(relayout(header, body, {name: ("I32", header[name]["shape"])}))
    with pytest.raises(ModelFileError, match="checksum"):
        SiameseDetector.load(retyped)
    forged = forge(path, tmp_path / "forged.safetensors", lambda h: h["params"].update(margin=-1.0))
    with pytest.raises(ModelFileError, match="margin"):
        SiameseDetector.load(forged)
