"""The format fuzzer's derandomised slice (``scripts/fuzz_formats.py``; README "Reliability").

Mutated model protobufs (bytes and fields) and ``.npz`` files (bytes, shapes, dtypes, names,
NaN, members) go through inspect, quantize (static and dynamic), prune and verify in-process:
every case exits 0, 1 or 2 (never 3), prints no traceback, refuses in one line with no output
written, and leaves its inputs unchanged. The benchmark run of the script covers 10,000 cases.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fuzz_formats  # noqa: E402

CASES = 400  # about 10 s here; the same cases on every run (seed 0)


@pytest.mark.parametrize("block", range(4))
def test_mutated_models_and_samples_never_crash(block):
    logging.disable(logging.WARNING)
    try:
        size = CASES // 4
        results = [
            fuzz_formats.run_case(case, 0) for case in range(block * size, (block + 1) * size)
        ]
    finally:
        logging.disable(logging.NOTSET)
    failing = [r for r in results if r["problems"]]
    assert not failing, failing[:5]
    codes = {r["code"] for r in results}
    assert 2 in codes and codes & {0, 1}  # the slice holds both refusals and completed runs
    kinds = {r["mutation"] for r in results}
    assert len(kinds) >= 15  # most mutation kinds are drawn in each block
