"""What the multi-process and multi-device tests share: a gloo group on 127.0.0.1 spawned from a
test (PyTorch), and a child interpreter with 8 host devices (JAX).

The worker functions stay in their test modules (``torch.multiprocessing.spawn`` imports them by
name in each process); this module only starts, joins and tears down."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free TCP port on the loopback address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """This process as ``rank`` of a gloo group of ``world`` over 127.0.0.1 (one thread each: the
    machine has 2 cores).  On a normal exit every rank meets at a barrier, after a collection
    (DDP modules and their reducers gone), before the group goes: gloo can hang or abort at exit
    otherwise."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        yield
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_gloo(worker: Callable[..., None], world: int, out: str, timeout: float, what: str) -> float:
    """``worker(rank, world, port, out)`` in ``world`` processes; the seconds they took.  What a
    worker raises is raised here; a hang past ``timeout`` fails the test, not the whole run."""
    import torch.multiprocessing

    start = time.perf_counter()
    ctx = torch.multiprocessing.spawn(worker, args=(world, free_port(), out), nprocs=world, join=False)
    while not ctx.join(timeout=5):
        if time.perf_counter() - start > timeout:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} {what} workers did not finish in {timeout} s")
    return time.perf_counter() - start


def device_child(module: str, devices: int = 8, timeout: float = 600) -> dict[str, Any]:
    """``python -m module`` with ``devices`` JAX host devices; the JSON report its last line
    prints (with ``seconds``: its checks' time), plus ``wall``."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, f"the {devices}-device child failed:\n{run.stderr[-4000:]}"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    report["wall"] = time.perf_counter() - start
    print(f"\n{devices}-device child: {report['wall']:.1f} s wall ({report['seconds']:.1f} s of checks)")
    return report
