"""The sweep over ONNX's own backend test models (``scripts/sweep.py``), run in full.

Every model of the installed onnx package (node, pytorch-converted, pytorch-operator, simple,
light) through ``inspect``, ``quantize --synthetic 8`` and ``prune --ratio 0.3``: each run either
writes a model that passes the checker, runs in onnxruntime and matches the original within the
sweep's documented tolerance, or refuses with one line whose reason is in the reviewed list
``REASONS`` (each with a written reason). No traceback, no crash, no invalid model.
"""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    sweep = load_script("sweep")
    workdir = tmp_path_factory.mktemp("sweep")
    cases = sweep.corpus(workdir)
    return sweep, cases, sweep.sweep(cases, workdir, workers=2)


def test_every_model_is_handled_or_refused_for_a_reviewed_reason(swept):
    sweep, cases, results = swept
    assert set(results) == {c.id for c in cases}, "a model was lost by the sweep"
    assert sweep.problems_of(results) == []


def test_corpus_is_the_whole_backend_suite(swept):
    _, cases, _ = swept
    per_category = Counter(c.category for c in cases)
    assert per_category["node"] > 1000
    assert all(
        per_category[c] > 0 for c in ("pytorch-converted", "pytorch-operator", "simple", "light")
    )


def test_real_architectures_are_never_refused(swept):
    # ResNet-50, VGG-19, SqueezeNet, Inception, DenseNet ...: all three commands must succeed.
    _, cases, results = swept
    for case in cases:
        if case.category == "light":
            assert {k: v["code"] for k, v in results[case.id].items()} == {
                "inspect": 0,
                "quantize": 0,
                "prune": 0,
            }, case.id


def test_each_reviewed_reason_is_used_and_explained(swept):
    sweep, _, results = swept
    used = {o.get("reason") for per in results.values() for o in per.values()} - {None}
    assert used == set(sweep.REASONS), "drop reasons no model needs; review new ones"
    assert all(len(why) > 40 for _, why in sweep.REASONS.values())
