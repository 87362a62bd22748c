"""How a fused head cuts its (N, C) logits into chunks (docs/design.md, "Fused heads"): pure arithmetic on shapes,
no Triton, so the modules' inference helpers use it on any machine."""

from __future__ import annotations

import math

import torch

__all__ = ["CHUNK_BYTES", "default_chunk_rows", "head_chunk_rows", "default_chunk_classes", "prefer_class_chunks",
           "row_chunks", "class_chunks"]

# Target size of one (rows, C) logits chunk. Every row chunk after the first reads and writes the (C, D) fp32 dW
# accumulator once (8 C D bytes): at 4096 x 1024 -> 131072 bf16, 256 MiB chunks (4 of them) moved ~3.2 GB for it,
# ~1 ms of the 6.87 ms step measured on an H100; 512 MiB chunks (2) move ~1.1 GB, for 256 MiB more buffer.
CHUNK_BYTES = 512 << 20
# Nominal H100 ratio of bf16 matmul rate to HBM bandwidth (725 TFLOP/s / 3.0 TB/s), for prefer_class_chunks.
_FLOP_PER_BYTE = 725e12 / 3.0e12


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def default_chunk_rows(num_classes: int, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a (rows, C) buffer of ``dtype`` is at most ``chunk_bytes`` (>= 1 row; a multiple of
    64 from 64 rows up, a friendly M for the matmuls)."""
    rows = max(1, chunk_bytes // (max(num_classes, 1) * _itemsize(dtype)))
    return rows - rows % 64 if rows >= 64 else rows


def head_chunk_rows(num_rows: int, in_features: int, num_classes: int, dtype: torch.dtype, *,
                    need_weight_grad: bool = True, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk of a fused head when ``chunk_rows`` is not given: the whole batch when its (N, C) buffer takes
    no more than a chunk plus the (C, D) fp32 dW accumulator that several row chunks of a half-precision head would
    need (``4 C D`` bytes): the same peak memory, without the accumulator's traffic (read and written once per
    extra chunk, then cast) or the logits that class chunks recompute; else :func:`default_chunk_rows`. At
    4096 x 1024 -> 131072 bf16 that is one 1 GiB chunk instead of two of 512 MiB and a 512 MiB accumulator."""
    itemsize = _itemsize(dtype)
    accumulator = 4 * num_classes * in_features if need_weight_grad and itemsize < 4 else 0
    if num_rows * num_classes * itemsize <= chunk_bytes + accumulator:
        return max(num_rows, 1)
    return default_chunk_rows(num_classes, dtype, chunk_bytes)


def default_chunk_classes(num_rows: int, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Classes per chunk of the class-chunked path: an (N, cols) buffer of at most ``chunk_bytes``, a multiple of
    128 (at least 128)."""
    cols = chunk_bytes // (max(num_rows, 1) * _itemsize(dtype))
    return max(128, cols - cols % 128)


def prefer_class_chunks(N: int, D: int, C: int, rows: int, cols: int) -> bool:
    """Row chunks of ``rows`` cost the fp32 dW accumulator, read and written once per extra chunk (``8 C D`` bytes
    each); K class chunks of ``cols`` cost the logits matmuls of all but the last chunk again
    (``2 N D C (K - 1) / K`` FLOPs). Pick the cheaper, by count."""
    extra_row_chunks = math.ceil(N / max(rows, 1)) - 1
    K = math.ceil(C / max(cols, 1))
    return extra_row_chunks * 8 * C * D * _FLOP_PER_BYTE * K > 2 * N * D * C * (K - 1)


def row_chunks(N: int, rows: int) -> list[tuple[int, int]]:
    """``[(r0, r1), ...]``: the row chunks of ``rows`` rows (the last may be shorter)."""
    return [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]


def class_chunks(C: int, cols: int) -> list[tuple[int, int]]:
    """``[(c0, c1), ...]``: the class chunks of ``cols`` classes (the last may be shorter)."""
    return [(c0, min(C, c0 + cols)) for c0 in range(0, C, cols)]
