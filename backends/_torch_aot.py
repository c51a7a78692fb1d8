"""Fused PyTorch loss kernels, compiled ahead of time in a background process and cached on disk.

Why.  In eager PyTorch every array operation is a kernel launch of one to two microseconds on a
CPU; the accurate formulas are about twenty operations where ``F.cross_entropy`` is two, so at the
batch sizes of most training (tens to hundreds of examples) the loss costs several times the native
one although its arithmetic is trivial.  The loss and its gradient, exported with
``torch.export`` and compiled by AOTInductor, are one C++ kernel: about fifteen microseconds a
call plus one vectorised pass over the logits (Inductor keeps IEEE semantics: no fast-math, no
contraction on CPU).  Which formulas (:func:`float32_formulas`):

* a softmax head: the eager path's own (float64, rounded once), so the kernel's numbers are the
  eager ones bit for bit;
* a sigmoid head: the float32 formulas with error-free transformations (those ``torch.compile``
  fuses for large inputs).  Per logit a sigmoid loss is two float64 transcendentals, which cost
  three to four times float32's: the wide kernel took twice the native time from 32768 logits
  on.  The float32 kernels agree with the eager formulas within docs/semantics.md §11, not bit
  for bit.  They are two (:func:`parts`): the loss for the forward pass, the gradient for the
  backward pass, recomputed from the logits and labels, so that nothing of the logits' size is
  kept in between (``BCEWithLogits`` keeps nothing either).

When.  Nothing is compiled in the caller's process and nothing waits (``fused="auto"``):

1. A head runs its eager formulas.  Once it has been called :data:`HOT_CALLS` times with one kind
   of input (:class:`Signature`), a separate Python process (``python -m
   unihead.backends._torch_aot``, at low priority) exports and compiles that function.
2. The package lands in the cache (:func:`cache_dir`); a later call finds it, loads it (a few
   milliseconds) and runs it from then on.  In a new process an existing package is loaded at the
   first call.
3. Without a C++ compiler (or if the build fails) the head keeps its eager formulas: the same
   numbers (a softmax head) or numbers within the same tolerances (a sigmoid head), slower.
   The reason is logged once (logger ``"unihead"``), and a failed build is not retried for a
   day (delete its ``.failed`` file to retry now).

``fused=True`` builds on the first call and waits (what :meth:`TorchHead.warmup` does);
``fused=False`` or ``UNIHEAD_TORCH_FUSED=0`` never compiles.  A package is keyed by the head, the
kind of input, the source of the formulas, and the versions of unihead, PyTorch and Python.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["HOT_CALLS", "Signature", "KernelCache", "cache_dir", "compiler_available"]

log = logging.getLogger("unihead")

#: Calls with one signature after which a head's kernel is built in the background.
HOT_CALLS = int(os.environ.get("UNIHEAD_TORCH_HOT_CALLS", "50"))
#: A failed build is retried after this many seconds.
RETRY_AFTER = 86400.0
#: Check on a background build every this many calls.
POLL_EVERY = 16


def cache_dir() -> Path:
    """``$UNIHEAD_CACHE_DIR/torch-aot``, else ``$XDG_CACHE_HOME/unihead/torch-aot`` (default
    ``~/.cache``)."""
    root = os.environ.get("UNIHEAD_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unihead"
    return base / "torch-aot"


def compiler_available() -> bool:
    """Whether a C++ compiler Inductor would use is on this machine (``$CXX``, or ``c++``,
    ``g++`` or ``clang++`` on ``PATH``)."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0]) is not None
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


@dataclasses.dataclass(frozen=True)
class Signature:
    """The kind of input a kernel is compiled for.  Logits are ``(M, K)`` float32 on the CPU with
    ``M`` dynamic (leading dimensions are flattened into ``M``); labels are what validation makes
    of them, flattened the same way: int64 ids ``(M,)`` (``sparse``), float32 ``(M,)``
    (``binary``, binary ``probabilities``) or float32 ``(M, K)``; the sample weight, if any, is
    ``(M,)`` or, per label, ``(M, K)``."""

    head: str  # the spec as JSON
    weight_ndim: int  # 0: no sample weight
    label_dtype: str = ""  # as given ("int32", "int64", "float32", ...), converted in the kernel; "" = normal form

    def parts(self) -> tuple[str, ...]:
        """The kernels of this signature (:func:`parts`)."""
        from unihead.spec import ClassificationHead

        return parts(ClassificationHead.from_json(self.head))

    def parallel_from(self) -> int:
        """The number of logits from which this signature's ``-parallel`` kernels run."""
        from unihead.spec import ClassificationHead

        return parallel_from(ClassificationHead.from_json(self.head))

    def key(self) -> str:
        text = json.dumps(
            [dataclasses.asdict(self), _source_hash(), _versions()], sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()[:32]


#: The modules of ``unihead`` the kernel is traced from (named as modules: a renamed file fails
#: the import here rather than going unhashed).
_SOURCES = ("_ops", "_engine", "formulas", "_validation", "spec")
_source_digest: str | None = None


def _source_hash() -> str:
    """A digest of the code the kernel is traced from (a changed formula builds a new kernel)."""
    global _source_digest
    if _source_digest is None:
        import importlib

        h = hashlib.sha256()
        for name in _SOURCES:
            h.update(Path(importlib.import_module(f"unihead.{name}").__file__).read_bytes())
        for mod in ("torch", "_torch_aot"):
            h.update(Path(__file__).with_name(f"{mod}.py").read_bytes())
        _source_digest = h.hexdigest()
    return _source_digest


def _versions() -> list[str]:
    """What a kernel depends on besides the code: the versions of what it is traced and compiled
    with, and the CPU (Inductor compiles with ``-march=native``: a cache shared between machines
    must not hand one's kernel to the other)."""
    import platform

    import array_api_compat
    import torch

    from unihead._version import __version__

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        names = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        cpu = hashlib.sha256("\n".join(sorted(set(names))).encode()).hexdigest()[:16]
    except OSError:
        pass
    return [__version__, torch.__version__, array_api_compat.__version__, platform.python_version(),
            platform.machine(), cpu, torch.backends.cpu.get_cpu_capability()]


#: The build runs with Inductor's defaults (IEEE semantics: no fast-math, no contraction), whatever
#: the caller's environment says: environment variables of these prefixes are not passed on.
_CLEARED_ENV = ("TORCHINDUCTOR_", "TORCH_COMPILE_", "TORCHDYNAMO_")
#: A build lock older than this is a build that died: it is taken over.
LOCK_STALE = 1800.0
#: Background builds running at once on this machine (per cache directory): each is a compiler
#: and ~300 MB, and a program with many hot heads (a sweep, the conformance suite) would
#: otherwise start one per head at the same time.  A head whose build finds no free slot keeps
#: its eager formulas and asks again every :data:`POLL_EVERY` calls; ``warmup()`` does not wait
#: for a slot.
BUILD_SLOTS = max(1, int(os.environ.get("UNIHEAD_TORCH_BUILDS", "1")))
#: A build slot older than this belongs to a build that was killed: it is taken over.
SLOT_STALE = 600.0


def _take_file(path: Path, stale: float) -> bool:
    """Create ``path`` if it does not exist (atomically), taking over one older than ``stale``
    seconds (left by a process that died)."""
    for _ in range(2):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            try:
                if time.time() - path.stat().st_mtime < stale:
                    return False
                path.unlink()
            except OSError:
                pass
        except OSError:  # an unwritable cache: no build
            return False
    return False


def _take_slot() -> Path | None:
    """A free background-build slot of this machine (its lock file), or None."""
    for i in range(BUILD_SLOTS):
        slot = cache_dir() / f"build-slot-{i}.lock"
        if _take_file(slot, SLOT_STALE):
            return slot
    return None


# ------------------------------------------------------------------------------ the kernel
def float32_formulas(head: Any) -> bool:
    """Whether the kernel of ``head`` runs the float32 formulas (sigmoid heads) rather than the
    wide ones (softmax heads; see the module's docstring)."""
    return head.activation == "sigmoid"


def parts(head: Any) -> tuple[str, ...]:
    """The kernels of one signature, the package's first: a softmax head's ``"main"``; a sigmoid
    head's ``"loss"`` (the forward pass) and ``"grad"`` (the backward pass, which recomputes the
    gradient as ``BCEWithLogits`` does: nothing of the logits' size is kept in between).  Each
    also as a ``"-parallel"`` kernel, for inputs of :func:`parallel_from` logits or more."""
    serial = ("loss", "grad") if float32_formulas(head) else ("main",)
    return serial + tuple(f"{part}-parallel" for part in serial)


#: Inputs of this many logits or more run a head's ``-parallel`` kernels (:func:`parallel_from`).
#: Inductor decides at compile time, from the size of the example input, whether a loop is
#: spread over the cores (OpenMP); :func:`build` makes the others one thread.  One thread, a
#: sigmoid head's loss costs 80 us at multilabel (4096, 10) on 2 cores (BCEWithLogits' forward:
#: 60-85), a softmax head's 650 us at (4096, 10); exported with a large example, 49 and 330 us, but
#: the parallel region costs 1-4 us a call for a sigmoid head and 5-11 for a softmax head (a few
#: regions) where a small input's whole call is 3-15 us.  Measured crossovers on 2 cores: a
#: softmax kernel about 2000 logits, a sigmoid head's loss 2000-3000 and gradient about 16000.
PARALLEL_FROM_SOFTMAX = 2048
PARALLEL_FROM_SIGMOID = 8192
#: The number of logits of the example input the ``-parallel`` kernels are exported with: large
#: enough that Inductor spreads the loops over every core (it wants 512 elements a thread).
PARALLEL_EXAMPLE = 2**17


def parallel_from(head: Any) -> int:
    """The number of logits from which ``head``'s ``-parallel`` kernels run."""
    return PARALLEL_FROM_SIGMOID if float32_formulas(head) else PARALLEL_FROM_SOFTMAX


def part_path(path: Path, part: str) -> Path:
    """Where kernel ``part`` of the package ``path`` (the signature's first part) is stored."""
    return path if part in ("main", "loss") else path.with_suffix(f".{part}.pt2")


def kernel_function(sig: Signature, part: str = "main") -> Any:
    """The module exported for ``sig``, ``(z, labels[, sample_weight]) -> outputs``:
    ``"main"``: ``(loss, grad, bad)``, the loss and its gradient for a unit upstream gradient
    (``Engine.loss_and_grad``, with the formulas of :func:`float32_formulas`) and whether any
    label or weight value is invalid (``validation.value_errors``), all in one kernel;
    ``"loss"``: ``(loss, bad)``; ``"grad"``: ``(grad,)`` (see :func:`parts`)."""
    import torch

    from unihead._engine import Engine
    from unihead.spec import ClassificationHead
    from unihead._validation import value_errors

    from .torch import TorchOps

    head = ClassificationHead.from_json(sig.head)
    ops = TorchOps(wide=not float32_formulas(head))
    engine = Engine(head, ops)

    normal = torch.int64 if head.label_format == "sparse" else torch.float32

    def run(z: Any, labels: Any, weight: Any) -> Any:
        if part == "grad":  # values checked by the forward pass
            return (engine.loss_and_grad(z, labels.to(normal), weight)[1],)
        bad = value_errors(ops, head, labels, weight)  # on the values as given
        loss, grad = engine.loss_and_grad(z, labels.to(normal), weight, grad=part == "main")
        return (loss, grad, bad) if part == "main" else (loss, bad)

    class Kernel(torch.nn.Module):
        def forward(self, z: Any, labels: Any) -> Any:
            return run(z, labels, None)

    class WeightedKernel(torch.nn.Module):
        def forward(self, z: Any, labels: Any, sample_weight: Any) -> Any:
            return run(z, labels, sample_weight)

    return WeightedKernel() if sig.weight_ndim else Kernel()


def example_inputs(sig: Signature, part: str = "main") -> tuple[Any, ...]:
    """Zeros of the signature's shapes and dtypes: 16 rows, or :data:`PARALLEL_EXAMPLE` logits
    for a ``-parallel`` part."""
    import torch

    from unihead.spec import ClassificationHead

    head = ClassificationHead.from_json(sig.head)
    k = head.num_outputs
    # at least 2 rows: export fixes a dimension of example size 1 to a constant
    m = max(2, -(-PARALLEL_EXAMPLE // k)) if part.endswith("-parallel") else 16
    z = torch.zeros(m, k)
    dtype = getattr(torch, sig.label_dtype) if sig.label_dtype else (
        torch.int64 if head.label_format == "sparse" else torch.float32)
    if head.label_format == "sparse":
        labels = torch.zeros(m, dtype=dtype)
    elif head.label_format in ("binary", "probabilities") and head.task == "binary":
        labels = torch.zeros(m, dtype=dtype)
    else:
        labels = torch.zeros(m, k, dtype=dtype)
    if sig.weight_ndim:
        return z, labels, torch.ones((m,) if sig.weight_ndim == 1 else (m, k))
    return z, labels


def build(sig: Signature, out: Path) -> None:
    """Export and compile the kernels of ``sig`` into the package ``out`` and its other parts
    (:func:`parts`), each written atomically, ``out`` last: once it exists, all do."""
    import torch
    from torch.export import Dim

    m = Dim("M", min=1, max=2**40)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Inductor writes a plain `omp parallel` (as many threads as the caller's process has when the
    # kernel runs) only if the compiling process has one thread per CPU; otherwise it hard-codes
    # its own count (an OMP_NUM_THREADS=1 under torchrun would make every loop serial, in a
    # package cached for later processes).  The one-thread kernels are one thread whatever the
    # number of classes (16 rows of 64 classes would be spread over 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        for part in reversed(sig.parts()):
            args = example_inputs(sig, part)
            dynamic = tuple({0: m} for _ in args)
            program = torch.export.export(kernel_function(sig, part.removesuffix("-parallel")), args,
                                          dynamic_shapes=dynamic, strict=False)
            configs = {} if part.endswith("-parallel") else {"cpp.threads": 1}
            fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=out.parent)
            os.close(fd)
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=configs)
                os.replace(tmp, part_path(out, part))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    finally:
        torch.set_num_threads(threads)


class _Runner:
    """One signature's kernels (:func:`parts`): ``run`` is the forward pass's (``"main"``: ``(loss,
    grad, bad)``; ``"loss"``: ``(loss, bad)``), ``grad`` a sigmoid head's backward pass's
    (``(grad,)``); each call takes the ``-parallel`` kernel from ``parallel_from`` logits on."""

    __slots__ = ("_run", "_run_parallel", "_grad", "_grad_parallel", "_from")

    def __init__(self, loaders: dict[str, Any], parallel_from: int):
        first = "loss" if "loss" in loaders else "main"
        self._run, self._run_parallel = loaders[first].run, loaders[f"{first}-parallel"].run
        if "grad" in loaders:
            self._grad, self._grad_parallel = loaders["grad"].run, loaders["grad-parallel"].run
        self._from = parallel_from

    def run(self, args: list) -> Any:
        return (self._run_parallel if args[0].numel() >= self._from else self._run)(args)

    def grad(self, args: list) -> Any:
        return (self._grad_parallel if args[0].numel() >= self._from else self._grad)(args)


# ------------------------------------------------------------------------------ the cache
class _Entry:
    """One signature's kernel: counting calls, building, loading.  One build at a time per
    kernel across processes (a lock file next to the package): the other processes wait for the
    package to appear."""

    def __init__(self, sig: Signature):
        self.sig = sig
        self.key = sig.key()
        self.path = cache_dir() / f"{self.key}.pt2"
        self.parts = sig.parts()
        self.parallel_from = sig.parallel_from()
        self.calls = 0
        self.runner: Any = None
        self.state = "new"  # new | building | waiting (another process builds) | ready | off
        self.proc: subprocess.Popen | None = None
        self.slot: Path | None = None  # the machine's build slot our build holds
        self.started = 0.0
        self._lock = threading.Lock()

    def _file(self, suffix: str) -> Path:
        return self.path.with_suffix(suffix)

    def _failed_recently(self) -> bool:
        try:
            return time.time() - self._file(".failed").stat().st_mtime < RETRY_AFTER
        except OSError:
            return False

    def _load(self) -> bool:
        import torch

        paths = [part_path(self.path, part) for part in self.parts]
        try:
            loaders = [torch._inductor.aoti_load_package(str(p)).loader for p in paths]
        except Exception as exc:  # a corrupt or foreign package, a missing part: rebuild it
            log.info("unihead: could not load the fused kernel %s (%s)", self.path, exc)
            for p in paths:
                try:
                    p.unlink()
                except OSError:
                    pass
            return False
        self.runner = _Runner(dict(zip(self.parts, loaders)), self.parallel_from)
        self.state = "ready"
        return True

    def _built_elsewhere(self) -> bool:
        """Whether another process holds this kernel's build lock (it then needs no slot here)."""
        try:
            return time.time() - self._file(".lock").stat().st_mtime < LOCK_STALE
        except OSError:
            return False

    def _take_lock(self) -> bool:
        return _take_file(self._file(".lock"), LOCK_STALE)  # else another process builds it

    def _start(self, wait: bool) -> None:
        if not compiler_available():
            self.state = "off"
            log.info("unihead: no C++ compiler found; PyTorch losses run their eager formulas "
                     "(slower, within the same tolerances)")
            return
        if self._failed_recently():
            self.state = "off"
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        slot = None
        if not wait and not self._built_elsewhere():
            slot = _take_slot()
            if slot is None:  # other builds run: ask again in POLL_EVERY calls
                return
        if not self._take_lock():
            if slot is not None:
                slot.unlink(missing_ok=True)
            self.state = "waiting"
            self.started = time.time()
            if wait:
                self._wait_for_other()
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEARED_ENV)}
        env.update(TORCHINDUCTOR_COMPILE_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
        with open(self._file(".log"), "wb") as log_file:  # a file, not a pipe: nothing can fill up
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "unihead.backends._torch_aot", json.dumps(dataclasses.asdict(self.sig)),
                 str(self.path), *([] if slot is None else [str(slot)])],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=env,
                start_new_session=True,  # the caller's Ctrl-C is not the build's
            )
        self.slot = slot
        self.state = "building"
        self.started = time.time()
        if wait:
            self.proc.wait()
            self._finish()

    def _wait_for_other(self) -> None:
        while not self.path.exists() and self._file(".lock").exists():
            time.sleep(0.2)
        if not (self.path.exists() and self._load()):
            self.state = "off"

    def _finish(self) -> None:
        proc, self.proc = self.proc, None
        try:
            err = self._file(".log").read_text(errors="replace")
        except OSError:
            err = ""
        try:
            if proc.returncode == 0 and self.path.exists() and self._load():
                log.info("unihead: fused kernel ready after %.1f s: %s", time.time() - self.started, self.path)
                return
            self.state = "off"
            tail = err.strip().splitlines()[-1] if err.strip() else f"exit status {proc.returncode}"
            log.info("unihead: building a fused PyTorch kernel failed (%s); the eager formulas stay "
                     "in use (slower, within the same tolerances)", tail)
            try:
                self._file(".failed").write_text(err[-20000:])
            except OSError:
                pass
        finally:
            for path in (self._file(".lock"), self._file(".log"), self.slot):
                try:
                    if path is not None:
                        path.unlink()
                except OSError:
                    pass
            self.slot = None

    def get(self, mode: Any, count: bool = True) -> Any:
        """The kernel's runner, or None while there is none (yet).  ``mode is True``: build or
        load it now and wait.  ``count``: this call counts towards :data:`HOT_CALLS`."""
        if self.state == "ready":
            return self.runner
        if self.state == "off":
            return None
        with self._lock:
            if count:
                self.calls += 1
            if self.state == "new":
                if self.path.exists() and self._load():
                    return self.runner
                if mode is True or (self.calls >= HOT_CALLS and (self.calls - HOT_CALLS) % POLL_EVERY == 0):
                    self._start(wait=mode is True)
            elif self.state == "building":
                if mode is True:
                    self.proc.wait()
                    self._finish()
                elif self.calls % POLL_EVERY == 0 and self.proc.poll() is not None:
                    self._finish()
            elif self.state == "waiting":  # another process builds it
                if mode is True:
                    self._wait_for_other()
                elif self.calls % POLL_EVERY == 0 and (self.path.exists() or not self._file(".lock").exists()):
                    if not (self.path.exists() and self._load()):
                        self.state = "new"  # that build failed: build it here when hot
            return self.runner


class KernelCache:
    """The fused kernels of one compiled head, by :class:`Signature`."""

    def __init__(self, head: Any, mode: Any):
        self.head_json = head.to_json()
        self.mode = mode  # "auto" | True
        self.float32_formulas = float32_formulas(head)
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.Lock()

    def _entry(self, weight_ndim: int, label_dtype: Any) -> _Entry:
        key = (weight_ndim, label_dtype)
        entry = self._entries.get(key)
        if entry is None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    name = str(label_dtype).replace("torch.", "")
                    entry = self._entries[key] = _Entry(Signature(self.head_json, weight_ndim, name))
        return entry

    def runner(self, weight_ndim: int, label_dtype: Any, count: bool = True) -> Any:
        """The kernel for labels of ``label_dtype`` and a sample weight of rank ``weight_ndim``
        (0: none), or None; ``count``: the call counts towards building it."""
        return self._entry(weight_ndim, label_dtype).get(self.mode, count)

    def warmup(self, weight_ndim: int, label_dtype: Any) -> bool:
        """Build (or load) this kernel now and wait for it; True if it is in use."""
        return self._entry(weight_ndim, label_dtype).get(True) is not None

    def __getstate__(self) -> dict:
        return {"head_json": self.head_json, "mode": self.mode}

    def __setstate__(self, state: dict) -> None:
        from unihead.spec import ClassificationHead

        self.__dict__.update(state, _entries={}, _lock=threading.Lock())
        self.float32_formulas = float32_formulas(ClassificationHead.from_json(self.head_json))


def _main(argv: list[str]) -> int:
    spec, out = argv[0], Path(argv[1])
    try:
        os.nice(10)  # a background build should not slow the training that asked for it
    except (AttributeError, OSError):
        pass
    sig = Signature(**json.loads(spec))
    try:
        build(sig, out)
    finally:
        if len(argv) > 2:  # the machine's build slot this build holds
            Path(argv[2]).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
