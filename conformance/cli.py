"""``unihead conformance`` (also ``python -m unihead.conformance``): run the suite on every
installed backend, print the matrix, exit 0 only if every installed backend passes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from .adapters import BUILTIN
from .cases import generate
from .suite import FUSED_NOTE, SHARDED_NOTE, SPLIT_NOTE, failure_details, matrix, references, run, write_cases

TASKS = ("binary", "multiclass", "multilabel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", action="append", metavar="NAME",
        help="a backend to run (repeatable): numpy, torch, jax, flax, keras-jax, keras-torch, keras-tensorflow, "
             "a name registered in the 'unihead.backends' entry-point group, or package.module:compile_head. "
             "Default: every built-in backend and every registered one.")
    parser.add_argument("--task", action="append", choices=TASKS, help="only cases of this task (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a small subset of the cases (seconds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case generator (default 0)")
    parser.add_argument("--json", metavar="FILE", help="write the full per-case report as JSON")
    parser.add_argument("--export", metavar="DIR",
                        help="write the cases and the reference outputs (.npz + index.json) and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def default_backends() -> list[str]:
    from unihead._registry import _entry_points

    return list(BUILTIN) + sorted(set(_entry_points()) - set(BUILTIN))


def run_command(args: argparse.Namespace) -> int:
    start = time.monotonic()
    cases = generate(args.seed, quick=args.quick, tasks=tuple(args.task) if args.task else None)
    if args.export:
        path = write_cases(args.export, cases, references(cases), seed=args.seed, quick=args.quick)
        print(f"wrote {len(cases)} cases with reference outputs to {path} (index.json + cases/*.npz)")
        return 0
    backends = args.backend or default_backends()
    mode = "quick" if args.quick else "full"
    print(f"unihead conformance: {len(cases)} cases ({mode}, seed {args.seed}) on {len(backends)} backends",
          flush=True)
    results = run(backends, cases, seed=args.seed, quick=args.quick, progress=not args.no_progress)
    print()
    print(matrix(results))
    print()
    print("cells: worst error over all cases, in ulp of the case's dtype (gradients: of the larger of their "
          "two terms); tolerance: values 4 ulp, gradients 6 ulp, focal loss +2*gamma, predictions exact "
          "(docs/semantics.md, section 11)")
    print(SPLIT_NOTE)
    print(FUSED_NOTE)
    print(SHARDED_NOTE)
    ftz = [BUILTIN.get(n, (n,))[0] for n, b in results.backends.items() if b.ftz]
    if ftz:
        print(f"flush subnormals to zero (absolute allowance K * smallest normal): {', '.join(ftz)}")
    details = failure_details(results)
    if details:
        print("\nfailures:\n" + details)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results.to_json(), fh, indent=1)
        print(f"\nper-case report: {args.json}")
    installed = [n for n, b in results.backends.items() if b.status != "not installed"]
    verdict = "PASS" if results.ok and installed else "FAIL"
    print(f"\n{verdict}: {len(installed)} installed backend(s), {time.monotonic() - start:.0f} s")
    return 0 if results.ok and installed else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="unihead conformance",
        description="Check that every installed backend gives the same probabilities, losses, predictions "
                    "and gradients as the independent reference.")
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
