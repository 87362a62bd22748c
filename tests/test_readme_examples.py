"""README.md's examples run as written (tests/readme_blocks.py gives each the names it takes as given); the
distributed ones run on two gloo ranks in tests/test_distributed_gloo.py."""

import math

import pytest
import readme_blocks as RB
import torch


@pytest.fixture(scope="module")
def blocks():
    return RB.python_blocks()


def test_readme_has_the_examples_the_tests_know(blocks):
    assert set(blocks) == set(RB.SINGLE_PROCESS + RB.DISTRIBUTED)


def test_usage(blocks):
    ns = RB.namespace()
    exec(blocks["usage"], ns)
    assert math.isfinite(float(ns["loss"].detach())) and ns["model"].weight.grad is not None
    adjusted = ns["logits"] - torch.log(ns["counts"].double() / ns["counts"].sum()).float()
    torch.testing.assert_close(ns["pred"], adjusted.argmax(dim=1))


def test_mixup(blocks):
    ns = RB.namespace()
    exec(blocks["mixup"], ns)
    target = ns["target"]
    assert target.shape == (RB.N, RB.NUM_CLASSES) and math.isfinite(float(ns["loss"].detach()))
    torch.testing.assert_close(target.sum(dim=1), torch.ones(RB.N))


def test_fused_heads(blocks):
    ns = RB.namespace()
    exec(blocks["heads"], ns)
    values, classes = ns["values"], ns["classes"]
    assert values.shape == classes.shape == (RB.N, 5) and math.isfinite(float(ns["loss"].detach()))
    head = ns["head"]
    logits = ns["features"] @ head.weight.T + (head.bias if head.bias is not None else 0)
    torch.testing.assert_close(values, logits.topk(5, dim=1).values)
