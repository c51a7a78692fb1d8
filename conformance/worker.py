"""Child-process worker: run exported cases on the backend of this process and save outputs.

    python -m unihead.conformance.worker CASE_DIR OUT.npz BACKEND

Progress goes to stdout as ``progress N`` lines; ``OUT.json`` holds per-case exceptions and
whether the backend flushes subnormals to zero.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .adapters import make_adapter
from .suite import read_cases, run_cases


def main(argv: list[str]) -> int:
    case_dir, out_file, backend = argv
    cases = read_cases(case_dir)
    adapter = make_adapter(backend)

    def progress(n: int) -> None:
        if n % 10 == 0 or n == len(cases):
            print(f"progress {n}", flush=True)

    outputs, crashed, ftz = run_cases(adapter, cases, progress)
    arrays = {f"{i}/{k}": v for i, out in enumerate(outputs) for k, v in out.items()}
    np.savez(out_file, **arrays)
    Path(out_file).with_suffix(".json").write_text(json.dumps(
        {"crashed": crashed, "ftz": ftz, "has_grad": adapter.has_grad is not False}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
