"""The Python examples of README.md, as the tests run them: :func:`python_blocks` reads them in order;
:func:`namespace` gives each the names its text takes as given (a model, counts, a batch), tiny and on the CPU."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastlt

README = Path(__file__).resolve().parent.parent / "README.md"
NUM_CLASSES, N = 11, 8
# the blocks in README order: which need a process group (run by gloo_cases.readme_blocks on real ranks)
SINGLE_PROCESS = ("usage", "mixup", "heads")
DISTRIBUTED = ("data_parallel", "class_parallel_head", "class_parallel_logits")


def python_blocks() -> dict[str, str]:
    """README's ```python blocks by name (:data:`SINGLE_PROCESS` then :data:`DISTRIBUTED`); a README with another
    number of blocks raises, so a new example gets a namespace here rather than going untested."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    names = SINGLE_PROCESS + DISTRIBUTED
    if len(blocks) != len(names):
        raise AssertionError(f"README.md has {len(blocks)} python blocks, tests/readme_blocks.py knows {len(names)}: "
                             "name the new one and give it a namespace")
    return dict(zip(names, blocks, strict=True))


def namespace(batch_seed: int = 0) -> dict:
    """The names the blocks take as given, on the CPU (backend 'auto': the reference path). The counts and the
    model come from seed 0, the batch (``x``, ``y``, ``features``, ``embeddings``) from ``batch_seed``."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train_labels = torch.randint(0, NUM_CLASSES, (200,), generator=gen)
    counts = fastlt.data.class_counts(train_labels, NUM_CLASSES).clamp(min=1)
    model = nn.Linear(16, NUM_CLASSES)
    gen.manual_seed(1000 + batch_seed)
    x = torch.randn(N, 16, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (N,), generator=gen)
    return dict(fastlt=fastlt, torch=torch, nn=nn, F=F, num_classes=NUM_CLASSES, train_labels=train_labels,
                counts=counts, model=model, x=x, y=y, logits=model(x).detach(), labels=train_labels,
                features=torch.randn(N, 2048, generator=gen), embeddings=torch.randn(N, 512, generator=gen))
