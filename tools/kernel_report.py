"""What the compiler makes of the kernels, without a GPU: registers, spills and SASS instruction counts.

``python tools/kernel_report.py [--arch 90] [--case NAME ...] [--sass DIR] [--check]`` compiles the kernels the
launchers would launch for each case (the launchers run with their kernels swapped for a recorder, so the
arguments, constexpr flags and alignment specialisation are exactly the runtime's) for an sm_``arch``
target, and prints per kernel: registers per thread, spilled bytes, shared memory, and SASS instruction
counts by class (global loads/stores, shared-memory traffic, barriers, MUFU transcendentals, FP32 math), the
size of each loop body, and spills inside the column loops (paid per tile: ``--check`` fails on those) and, apart,
inside a persistent program's loop around them (paid once per row block: reported, not failed), and how many of
the innermost loops that load are software-pipelined (async copies in their body; ``--check`` fails a row kernel
launched with ``STAGES > 1`` whose main loop, the column loop, is not), and that loop's SASS per element (its body
over the elements a thread holds per iteration: the figure SPEC 8's bandwidth budget is stated in), or for a
whole-row tile its straight path per element (``--check`` fails a row of :data:`BUDGETS` over its budget).
No GPU needed: triton compiles to cubin with its bundled ptxas, and cuobjdump reads it back.

Counting, not timing: a convert_layout through shared memory, a spill, or a class vector re-read from L2 per
element shows up here before a GPU session can time it. SASS counts are static (a loop body counts once).

Compiling a kernel for a target without its device takes Triton's private API, which changes between releases:
:func:`compile_for` is the one place that calls it (triton 3.4 to 3.9 known), and raises
:class:`UnsupportedTriton` on a Triton it does not know (``main`` then exits with status 3, and the test that runs
it skips with that reason). A developer tool, not installed with fastlt; the tests import it as ``tools.kernel_report``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch


@dataclass
class Compiled:
    kernel: str
    flags: str
    regs: int
    spill_bytes: int
    shared: int
    counts: dict
    sass: str


_CLASSES = {  # opcode classes; "\b" also ends a name before its ".E.128"-style modifiers
    "LDG": re.compile(r"\bLDG\b"),
    "LDGSTS": re.compile(r"\bLDGSTS\b"),  # async global -> shared copies: a software-pipelined loop's loads
    "STG": re.compile(r"\bSTG\b"),
    "LDS": re.compile(r"\bLDSM?\b"),
    "STS": re.compile(r"\bSTS\b"),
    "BAR": re.compile(r"\bBAR\b"),
    "SHFL": re.compile(r"\bSHFL\b"),
    "MUFU": re.compile(r"\bMUFU\b"),
    "FFMA/FMUL/FADD": re.compile(r"\bF(FMA|MUL|ADD)\b"),
    "IMAD/IADD/LOP": re.compile(r"\b(IMAD|IADD3|LOP3|SHF|LEA)\b"),
    "LDL/STL": re.compile(r"\b(LDL|STL)\b"),
}


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


class UnsupportedTriton(RuntimeError):
    """This Triton's private compile API is not one :func:`compile_for` knows."""


def compile_for(fn, args, kwargs, arch: int):
    """Compile the ``@triton.jit`` kernel ``fn`` for ``args``/``kwargs`` as ``fn[grid](*args, **kwargs)`` would, for an
    sm_``arch`` target with no device present. The only caller of Triton's private API here."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.compiler import compile as triton_compile
        from triton.runtime.jit import create_function_from_signature
    except ImportError as exc:
        raise UnsupportedTriton(f"triton {_triton_version()}: {exc}") from exc
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
    except (AttributeError, TypeError) as exc:  # the private helper's own signature moved
        raise UnsupportedTriton(f"triton {_triton_version()}: {exc}") from exc
    bound_args, specialization, options = binder(*args, **kwargs)
    if hasattr(fn, "_pack_args"):  # triton >= 3.6
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    else:  # triton 3.4, 3.5: what JITFunction.run does before it compiles
        try:
            from triton._utils import find_paths_if, get_iterable_path
        except ImportError as exc:
            raise UnsupportedTriton(f"triton {_triton_version()}: {exc}") from exc
        options = backend.parse_options(kwargs)
        sigvals = [x[0] for x in specialization]
        signature = dict(zip([p.name for p in fn.params], sigvals, strict=True))
        constexprs = {path: get_iterable_path(list(bound_args.values()), path)
                      for path in find_paths_if(sigvals, lambda _, val: val == "constexpr")}
        attrvals = [x[1] for x in specialization]
        attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k))
                 for k in find_paths_if(attrvals, lambda _, x: isinstance(x, str))}
    return triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _triton_version() -> str:
    import triton

    return triton.__version__


def _inspect(compiled, name: str, flags: str) -> Compiled:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    def field(name: str) -> int:
        m = re.search(name + r":(\d+)", res)
        return int(m.group(1)) if m else 0

    regs, spilled = field("REG"), field("STACK") + field("LOCAL")  # spills live on the stack
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    counts = collections.Counter()
    for ln in lines:
        for cls, pat in _CLASSES.items():
            if pat.search(ln):
                counts[cls] += 1
    counts["total"] = len(lines)
    counts["loops"] = _loop_sizes(lines)
    counts["loop spills"] = _loop_spills(lines, innermost=True)
    counts["row-loop spills"] = _loop_spills(lines, innermost=False)
    counts["pipelined loops"], counts["main loop pipelined"] = _pipelined(lines)
    counts["SASS/element"] = _per_element(lines, flags)
    counts["whole-row SASS/element"] = _whole_row_per_element(lines, flags)
    return Compiled(name, flags, regs, spilled, max(field("SHARED"), compiled.metadata.shared), dict(counts), sass)


def _elements_per_thread(flags: str) -> float | None:
    """The elements of a tile a thread holds, ``BLOCK_M * BLOCK_N / (32 * num_warps)`` (None without the sizes)."""
    sizes = {k: int(v) for k, v in re.findall(r"\b(BLOCK_M|BLOCK_N|num_warps)=(\d+)", flags)}
    if len(sizes) < 3:
        return None
    return sizes["BLOCK_M"] * sizes["BLOCK_N"] / (32 * sizes["num_warps"])


def _address(ln: str) -> int:
    """The address of a SASS line as cuobjdump prints it (``/*0a40*/``)."""
    return int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16)


def _per_element(lines: list[str], flags: str) -> str:
    """SASS instructions per element of the main loop (the largest innermost loop that loads: a row kernel's column
    loop), ``size/shortest`` as the loop sizes: its body over the elements a thread holds per iteration,
    ``BLOCK_M * BLOCK_N / (32 * num_warps)``. The figure to set against the bandwidth budget (SPEC 8: ~20 an element
    for a bf16 read-only pass on an H100, ~40 with the gradient written). "-" without such a loop or tile sizes (a
    whole-row tile, the combine, LADE's merge)."""
    per_thread = _elements_per_thread(flags)
    _, inner = _loading_loops(lines)
    if per_thread is None or not inner or re.search(r"\bSINGLE_TILE\b", flags):  # a whole-row tile: no column loop
        return "-"
    a, b = inner[0]
    size, skip = (b - a) // 16 + 1, _skipped(lines, a, b)
    return f"{size / per_thread:.1f}" + (f"/{(size - skip) / per_thread:.1f}" if skip else "")


def _whole_row_per_element(lines: list[str], flags: str) -> str:
    """A whole-row tile's (SINGLE_TILE) figure beside :func:`_per_element`'s: the instructions outside every loop
    before the first EXIT (a program's straight path through its row: load, statistics, the gradient in the forward,
    and its share of the row outputs; the spin waits are loops, not counted) over the elements a thread holds,
    ``BLOCK_M * BLOCK_N / (32 * num_warps)``. It includes the per-row work a column loop's figure leaves out, and the
    code around the batch denominator's loop that only the launch's first program runs (the others jump over it:
    ~12 an element of the 52.4 at 4096 x 8142 bf16), so it is larger than what a program runs, a static figure to
    compare builds with. "-" for other kernels."""
    per_thread = _elements_per_thread(flags)
    if per_thread is None or not re.search(r"\bSINGLE_TILE\b", flags):
        return "-"
    loops = _loops(lines)
    n = 0
    for ln in lines:
        if re.search(r"\bEXIT\b", ln):
            break
        n += not any(a <= _address(ln) <= b for a, b in loops)
    return f"{n / per_thread:.1f}"


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) addresses of each loop body: a backward branch and its target."""
    out = []
    for ln in lines:
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/.*\bBRA\b[^0x]*0x([0-9a-f]+)", ln)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            out.append((int(m.group(2), 16), int(m.group(1), 16)))
    return out


def _skipped(lines: list[str], a: int, b: int) -> int:
    """Instructions of the loop body ``[a, b]`` that a predicated forward branch inside it jumps over (a tile that
    holds no target skips its per-element target compare): the body minus these is its shortest path."""
    n, reach = 0, a
    for ln in lines:
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+@!?U?P\d\s+BRA\b[^0x]*0x([0-9a-f]+)", ln)
        if m:
            at, to = int(m.group(1), 16), int(m.group(2), 16)
            if a <= at and to <= b and to > at and at >= reach:
                n += (to - at) // 16 - 1
                reach = to
    return n


def _loop_sizes(lines: list[str]) -> str:
    """Instructions in each loop body, largest first: what one iteration of a column loop executes per thread (the
    totals also count each loop's copy of the tail tile); ``size/shortest`` where a branch inside skips some (see
    :func:`_skipped`)."""
    out = []
    for a, b in sorted(_loops(lines), key=lambda ab: ab[0] - ab[1]):
        size, skip = (b - a) // 16 + 1, _skipped(lines, a, b)
        out.append(f"{size}/{size - skip}" if skip else str(size))
    return ",".join(out) or "-"


def _innermost(loops: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]


def _loading_loops(lines: list[str]) -> tuple[dict[int, bool], list[tuple[int, int]]]:
    """``(loads, inner)``: each global load's address -> whether it is an async copy (LDGSTS), and the innermost
    loops that hold a load, largest first (the first is a row kernel's main loop, its column loop)."""
    loads = {}
    for ln in lines:
        m = re.match(r"\s+/\*([0-9a-f]+)\*/", ln)
        if m and (_CLASSES["LDG"].search(ln) or _CLASSES["LDGSTS"].search(ln)):
            loads[int(m.group(1), 16)] = bool(_CLASSES["LDGSTS"].search(ln))
    inner = sorted(((a, b) for a, b in _innermost(_loops(lines)) if any(a <= x <= b for x in loads)),
                   key=lambda ab: ab[0] - ab[1])
    return loads, inner


def _pipelined(lines: list[str]) -> tuple[str, str]:
    """``(p/n, main)``: of the n innermost loops that load from global memory, the p whose loads are
    software-pipelined (they hold async copies, LDGSTS: Triton pipelines a loop without tl.dot only when it is
    written ``tl.range(..., num_stages=k)`` with k > 1), and whether the largest of them (a row kernel's column loop;
    the others are short reductions) is: "yes" / "no" ("-", "-" when no innermost loop loads)."""
    loads, inner = _loading_loops(lines)
    if not inner:
        return "-", "-"
    piped = [any(a <= x <= b and is_async for x, is_async in loads.items()) for a, b in inner]
    return f"{sum(piped)}/{len(inner)}", "yes" if piped[0] else "no"


def _loop_spills(lines: list[str], innermost: bool) -> int:
    """Local-memory loads and stores (spills) inside loop bodies. ``innermost``: in loops that hold no other loop,
    the column loops, where they are paid per tile; else in the loops around them only (a persistent program's
    loop over its row blocks), paid once per row block, beside a whole row's tiles."""
    loops = _loops(lines)
    inner = _innermost(loops)
    n = 0
    for ln in lines:
        if _CLASSES["LDL/STL"].search(ln):
            addr = _address(ln)
            in_inner = any(a <= addr <= b for a, b in inner)
            n += in_inner if innermost else (not in_inner and any(a <= addr <= b for a, b in loops))
    return n


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel (compiled, or interpreted under ``TRITON_INTERPRET=1``) in the
    launchers: records each launch's arguments."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, args, kwargs))
        return launch


def record(run) -> list:
    """The launches ``run()`` makes through :mod:`fastlt.kernels` (nothing executes): ``[(fn, args, kwargs)]``.
    Under ``TRITON_INTERPRET=1`` (the tests without a GPU) the kernels are interpreted functions, recorded alike."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastlt.kernels import lade, launch, row_normalize

    calls: list = []
    patched = []
    for mod in (launch, lade, row_normalize):
        for name, obj in list(vars(mod).items()):
            if (hasattr(obj, "signature") and hasattr(obj, "params") and hasattr(obj, "fn")
                    or isinstance(obj, InterpretedFunction)):
                patched.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, calls))
    try:
        run()
    finally:
        for mod, name, obj in patched:
            setattr(mod, name, obj)
    return calls


def _flags(kwargs: dict) -> str:
    constexprs = {}
    for k, v in kwargs.items():
        if k.isupper() and hasattr(v, "_asdict"):  # a group of flags (fastlt.kernels.adjusted_ce.Flags)
            constexprs.update(v._asdict())
        elif k.isupper():
            constexprs[k] = v
    on = [k for k, v in constexprs.items() if v is True]
    sizes = [f"{k}={v}" for k, v in constexprs.items() if not isinstance(v, bool)]
    extra = [f"{k}={kwargs[k]}" for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs]
    return " ".join(on + sizes + extra)


def cases():
    """name -> a function that runs the launchers once on CPU stand-in tensors (nothing is computed)."""
    from fastlt._bench_harness import long_tail_counts as _counts
    from fastlt._operator import AdjustedCEArgs
    from fastlt.kernels import lade, launch
    from fastlt.priors import gcl_cloud, log_prior, prior

    def targets(N, C, dtype, soft):
        """Class indices, or (soft) class probabilities in the logits' dtype (mixup)."""
        return torch.empty((N, C), dtype=dtype) if soft else torch.zeros(N, dtype=torch.int64)

    def la(N, C, dtype, grad_in_forward=False, soft=False, smooth=False, **tile):
        def run():
            z = torch.empty((N, C), dtype=dtype)
            y = targets(N, C, dtype, soft)
            extra = dict(label_smoothing=0.1, gamma=2.0, weight=torch.ones(C)) if smooth else {}
            args = AdjustedCEArgs(log_prior=log_prior(_counts(C)).float(), reduction="sum" if soft else "mean",
                                  **extra)
            cfg = launch.pick_tiles(N, C, z.device, **tile) if tile else None
            loss, lse, factor = launch.loss(z, y, args, config=cfg, grad_out=z if grad_in_forward else None)
            if not grad_in_forward:
                launch.grad(z, y, args, lse, factor, None, config=cfg)
        return run

    def gcl(N, C, dtype, grad_in_forward=False, seed_tensor=False, soft=False, **tile):
        def run():
            z = torch.empty((N, C), dtype=dtype)
            y = targets(N, C, dtype, soft)
            args = AdjustedCEArgs(cloud=gcl_cloud(_counts(C)).float(), noise_mul=1.0, margin=0.5, scale=30.0,
                                  seed=torch.zeros(1, dtype=torch.int64) if seed_tensor else 3,
                                  reduction="sum" if soft else "mean")
            cfg = launch.pick_tiles(N, C, z.device, **tile) if tile else None
            loss, lse, factor = launch.loss(z, y, args, config=cfg, grad_out=z if grad_in_forward else None)
            if not grad_in_forward:
                launch.grad(z, y, args, lse, factor, None, config=cfg)
        return run

    def lade_case(N, C, dtype, **tile):
        def run():
            z = torch.empty((N, C), dtype=dtype)
            y = torch.zeros(N, dtype=torch.int64)
            pi = prior(_counts(C)).float()
            args = AdjustedCEArgs(log_prior=torch.log(pi))
            cfg = launch.pick_tiles(N, C, z.device, column_stats=True, **tile) if tile else None
            _, lse, factor, terms = lade.forward(z, y, pi, 0.1, 0.1, args, config=cfg)
            # with grad_output, as autograd calls it (the kernel scales the column term by it)
            launch.grad(z, y, args, lse, factor, torch.ones(()), column_term=terms.column_term)
        return run

    def cosine_head(N, D, C, dtype):
        def run():
            from fastlt.heads import functional as heads

            x = torch.zeros((N, D), dtype=dtype, requires_grad=True)
            w = torch.zeros((C, D), dtype=dtype, requires_grad=True)
            use_triton, heads.use_triton = heads.use_triton, lambda backend, t: True  # CPU stand-ins
            try:
                heads.cosine_cross_entropy(x, w, torch.zeros(N, dtype=torch.int64), noise_mul=1.0, margin=0.5,
                                           cloud=gcl_cloud(_counts(C)).float(), scale=30.0, seed=1, backend="triton")
            finally:
                heads.use_triton = use_triton
        return run

    def gcl_shard(N, C, W, dtype):
        def run():  # rank 1's launches of a class-sharded GCL loss at torch.chunk's start (not a multiple of 8)
            size = -(-C // W)
            z = torch.empty((N, size), dtype=dtype)
            y = torch.zeros(N, dtype=torch.int64)
            args = AdjustedCEArgs(cloud=gcl_cloud(_counts(C)).float(), noise_mul=1.0, margin=0.5, scale=30.0, seed=3)
            part = torch.empty((launch.PARTIAL_PLANES, N, 1), dtype=torch.float32)
            launch.chunk_partials(z, y, args, part, 0, col_base=size, num_classes=C)
            _, stats, coef = launch.combine_partials(part, y, args, C, out=torch.empty((), dtype=torch.float32))
            launch.grad(z, y, args, stats, coef, None, col_base=size, num_classes=C)
        return run

    def all_terms(N, C, dtype, soft=False):
        """Every per-column term at once (a log prior, GCL's noise, class weights with smoothing; or class
        probabilities with weights), the gradient in the forward, with the tiles an H100 gets (132 SMs: the CPU
        shows pick_tiles one): the widest pipelined loads, for the shared-memory check."""
        def run():
            from fastlt.kernels import tiles

            z = torch.empty((N, C), dtype=dtype)
            y = targets(N, C, dtype, soft)
            noise = {} if soft else dict(cloud=gcl_cloud(_counts(C)).float(), noise_mul=1.0, seed=3,
                                         label_smoothing=0.1)
            args = AdjustedCEArgs(log_prior=log_prior(_counts(C)).float(), weight=torch.ones(C),
                                  reduction="sum" if soft else "mean", **noise)
            count, tiles.sm_count = tiles.sm_count, lambda device: 132
            tiles._pick_tiles.cache_clear()
            try:
                launch.loss(z, y, args, grad_out=z)
            finally:
                tiles.sm_count = count
                tiles._pick_tiles.cache_clear()
        return run

    def switched(run, **policy):
        """``run`` under the tile policy ``policy`` (``tiles.reconfigured``)."""
        def wrapped():
            from fastlt.kernels import tiles

            with tiles.reconfigured(**policy):
                run()
        return wrapped

    def rescale(N, D, C, dtype):
        def run():  # the heads' backward: dx, dW, db times a scalar grad_output in one launch
            launch.scale_all([torch.empty((N, D), dtype=dtype), torch.empty((C, D), dtype=dtype),
                              torch.empty(C, dtype=dtype)], torch.ones(()))
        return run

    return {
        "la-131072-bf16": la(4096, 131072, torch.bfloat16),
        "la-131072-fp32": la(4096, 131072, torch.float32),
        "la-8142-fp32": la(4096, 8142, torch.float32),  # iNaturalist, recompute mode: 2-column vectors, 4 tiles a row
        "gcl-8142-bf16": gcl(4096, 8142, torch.bfloat16),
        "la-8142-bf16-fused": la(4096, 8142, torch.bfloat16, grad_in_forward=True),
        "la-512x8142-bf16-fused": la(512, 8142, torch.bfloat16, grad_in_forward=True),  # one launch: DENOM=1 (own)
        "gcl-131072-bf16": gcl(4096, 131072, torch.bfloat16),
        "gcl-8142-bf16-fused": gcl(4096, 8142, torch.bfloat16, grad_in_forward=True),
        # the same capped at 64 registers (tiles.WHOLE_ROW_MAX_REGISTERS, an A/B of benchmarks/ab_switches.py)
        "gcl-8142-bf16-fused-64-registers": switched(gcl(4096, 8142, torch.bfloat16, grad_in_forward=True),
                                                     WHOLE_ROW_MAX_REGISTERS=64),
        "gcl-131072-bf16-seed-tensor": gcl(4096, 131072, torch.bfloat16, seed_tensor=True),
        # the cosine GCL head's row kernel at 4096 x 1024 -> 131072 (its chunk is the whole batch): STORE_P, and the
        # persistent grid an H100 gets for it
        "gcl-131072-bf16-fused": gcl(4096, 131072, torch.bfloat16, grad_in_forward=True),
        "gcl-131072-bf16-fused-persistent": gcl(4096, 131072, torch.bfloat16, grad_in_forward=True, block_m=1,
                                                block_n=8192, num_warps=16, row_programs=132),
        "la-131072-bf16-fused": la(4096, 131072, torch.bfloat16, grad_in_forward=True),
        # the persistent grid an H100 gets for it (pick_tiles sees 1 SM on the CPU)
        "la-131072-bf16-fused-persistent": la(4096, 131072, torch.bfloat16, grad_in_forward=True, block_m=1,
                                              block_n=8192, num_warps=16, row_programs=132),
        "la-1M-bf16-split": la(128, 1_000_000, torch.bfloat16, num_splits=16),
        # GCL's gradient in the forward over split rows: STORE_P in the split forward, row_loss_grad's STORED after
        "gcl-1M-bf16-split-fused": gcl(128, 1_000_000, torch.bfloat16, grad_in_forward=True, num_splits=16),
        # rank 1 of 8 starts at 1018: its tiles start 2 columns past a multiple of 8 (NOISE_SHIFT=2)
        "gcl-shard-8142-over-8-bf16": gcl_shard(4096, 8142, 8, torch.bfloat16),
        "la-8142-fp32-whole-row": la(4096, 8142, torch.float32, grad_in_forward=True, block_n=8192, num_warps=16),
        # the longest bf16 row held whole with the gradient in the forward (tiles.WHOLE_ROW_BYTES): 32 elements a
        # thread of 16 warps, at the 128-register cap
        "gcl-16000-bf16-fused": gcl(4096, 16000, torch.bfloat16, grad_in_forward=True),
        "lade-131072-fp32": lade_case(4096, 131072, torch.float32),
        "lade-8142-bf16": lade_case(4096, 8142, torch.bfloat16),
        "cosine-gcl-head-bf16": cosine_head(256, 128, 1000, torch.bfloat16),
        "heads-rescale-bf16": rescale(4096, 1024, 131072, torch.bfloat16),
        # class-probability targets (mixup): the targets' tiles read beside the logits
        "la-soft-8142-bf16-fused": la(4096, 8142, torch.bfloat16, grad_in_forward=True, soft=True),
        # label smoothing (relative to the running max), class weights and the focal factor
        "la-smooth-focal-131072-bf16": la(4096, 131072, torch.bfloat16, smooth=True),
        "la-soft-131072-bf16": la(4096, 131072, torch.bfloat16, soft=True),
        "gcl-soft-1M-bf16-split-fused": gcl(128, 1_000_000, torch.bfloat16, grad_in_forward=True, num_splits=16,
                                            soft=True),
        # the persistent grid's 8192-wide fp32 tiles with four pipelined streams: 256 KB of buffers at 3 stages,
        # over an H100's 227 KB (OutOfResources on the GPU only); pick_tiles now drops a stage there
        "all-terms-32768-fp32-fused-h100": all_terms(4096, 32768, torch.float32),
        "la-soft-weights-32768-fp32-fused-h100": all_terms(4096, 32768, torch.float32, soft=True),
    }


def report(names=None, arch: int = 90, sass_dir: str | None = None) -> list[tuple[str, Compiled]]:
    out = []
    table = cases()
    for name in names or table:
        seen = set()
        for fn, args, kwargs in record(table[name]):
            key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            c = _inspect(compile_for(fn, args, kwargs, arch), fn.__name__, _flags(kwargs))
            out.append((name, c))
            if sass_dir:
                os.makedirs(sass_dir, exist_ok=True)
                with open(os.path.join(sass_dir, f"{name}.{fn.__name__}.{len(out)}.sass"), "w") as fh:
                    fh.write(c.sass)
    return out


def markdown(rows) -> str:
    cls = list(_CLASSES) + ["total", "loops", "SASS/element", "whole-row SASS/element", "loop spills",
                            "row-loop spills", "pipelined loops", "main loop pipelined"]
    head = "| case | kernel | flags | regs | spill B | smem B | " + " | ".join(cls) + " |"
    lines = [head, "|" + "---|" * (6 + len(cls))]
    for name, c in rows:
        lines.append(f"| {name} | {c.kernel} | {c.flags} | {c.regs} | {c.spill_bytes} | {c.shared} | "
                     + " | ".join(str(c.counts.get(k, 0)) for k in cls) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--case", nargs="*", default=None)
    p.add_argument("--sass", default=None, help="write each kernel's SASS into this folder")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a kernel spills inside a loop, needs more shared memory than an H100 block has, "
                        "a row kernel's column loop asked for stages (STAGES > 1) is not pipelined, or a loop (or "
                        "whole-row tile) of BUDGETS takes more SASS an element than its budget")
    a = p.parse_args(argv)
    try:
        rows = report(a.case, a.arch, a.sass)
    except UnsupportedTriton as exc:
        print(f"kernel_report: unsupported Triton ({exc})")
        return 3
    print(markdown(rows))
    bad = [f"{name}: {c.kernel} ({c.flags})" for name, c in rows if c.counts["loop spills"]]
    from fastlt.kernels.tiles import SMEM_BYTES

    big = [f"{name}: {c.kernel} ({c.flags}): {c.shared} B" for name, c in rows if c.shared > SMEM_BYTES]
    unpiped = [f"{name}: {c.kernel} ({c.flags}): {c.counts['pipelined loops']} loops pipelined" for name, c in rows
               if not_pipelined(c)]
    over = over_budget(rows)
    if (unpiped or over) and not performance_gated():
        print(f"triton {_triton_version()}: the pipelining and SASS budgets hold from triton "
              f"{'.'.join(map(str, GATED_FROM))} (not applied here):\n  " + "\n  ".join(unpiped + over))
        unpiped, over = [], []
    if a.check and (bad or unpiped or big or over):
        if bad:
            print("local-memory traffic inside a loop:\n  " + "\n  ".join(bad))
        if big:
            print(f"more shared memory than an H100 block has ({SMEM_BYTES} B):\n  " + "\n  ".join(big))
        if unpiped:
            print("column loops asked for stages but not pipelined:\n  " + "\n  ".join(unpiped))
        if over:
            print("column loops or whole-row tiles over their SASS budget an element:\n  " + "\n  ".join(over))
        return 1
    return 0


# SASS instructions an element that a main loop may take (its common path: the second of :func:`_per_element`'s
# figures where the loop has a branch rarely taken), by (case, kernel): SPEC 8's bf16 bandwidth budget on an H100,
# ~20 for a pass that reads the logits and ~40 for one that writes the gradient too (issue 17, item 7: GCL's noise
# within it), with room for the two Tritons CI compiles with (GCL's statistics loop: 18.4 with 3.9, 18.8 with 3.6
# since 16-bit rows take Philox's products in wide multiplies; 20.0 / 20.8 before). At C = 8142 (2-element vectors,
# whose Philox words cross threads through shared memory) it is 21.9 / 21.4: held to 22.5, over item 7's ~20.
# A whole-row tile (no column loop) is held to its whole-row figure instead (:func:`_whole_row_per_element`: the
# row's own work included): the iNaturalist rows with the gradient in the forward, LA 52.4 (3.9) / 51.9 (3.6) and
# GCL 71.5 / 73.1 since their masked tile moves 2-element vectors (65.3 and 86.1 when it moved 1).
BUDGETS = {
    ("gcl-131072-bf16", "row_loss_forward"): 20.0,
    ("gcl-8142-bf16", "row_loss_forward"): 22.5,
    ("gcl-131072-bf16", "row_loss_grad"): 40.0,
    ("gcl-1M-bf16-split-fused", "row_loss_forward"): 40.0,
    ("la-8142-bf16-fused", "row_loss_forward"): 55.0,
    ("gcl-8142-bf16-fused", "row_loss_forward"): 76.0,
    ("gcl-shard-8142-over-8-bf16", "row_loss_grad"): 38.0,  # 34.8 / 33.6 (two Philox calls per 8 columns)
}


# The Triton from which --check holds the kernels to BUDGETS and to pipelined column loops: the budgets were set with
# 3.6 (the device image's) and 3.9 (CI's). The declared floor, 3.4, compiles every case without spills, but pipelines
# fewer column loops (LA's forward over several tiles: 1 of its 3 loops) and takes more SASS in GCL's 8142 loop
# (28.1 an element): slower there, not wrong.
GATED_FROM = (3, 6)


def performance_gated() -> bool:
    """Whether this Triton is held to :data:`BUDGETS` and the pipelining check (from :data:`GATED_FROM` on)."""
    found = re.match(r"(\d+)\.(\d+)", _triton_version())
    return found is None or (int(found.group(1)), int(found.group(2))) >= GATED_FROM


def over_budget(rows) -> list[str]:
    """The rows of :data:`BUDGETS` whose main loop (or whole-row tile) takes more SASS an element than its budget, as
    messages."""
    over = []
    for name, c in rows:
        budget = BUDGETS.get((name, c.kernel))
        figure = c.counts.get("SASS/element", "-")
        if figure == "-":
            figure = c.counts.get("whole-row SASS/element", "-")
        if budget is not None and figure != "-" and float(figure.split("/")[-1]) > budget:
            over.append(f"{name}: {c.kernel}: {figure} an element, budget {budget}")
    return over


def not_pipelined(c: Compiled) -> bool:
    """A row kernel launched with ``STAGES > 1`` over several tiles a row (not SINGLE_TILE) whose main loop (its
    largest loading innermost loop: the column loop) is not software-pipelined."""
    stages = re.search(r"\bSTAGES=(\d+)", c.flags)
    if not stages or int(stages.group(1)) < 2 or re.search(r"\bSINGLE_TILE\b", c.flags):
        return False
    return c.counts.get("main loop pipelined", "-") == "no"


if __name__ == "__main__":
    raise SystemExit(main())
