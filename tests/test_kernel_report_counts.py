"""``tools/kernel_report.py``'s loop metrics on hand-written SASS: a loop's size and its shortest path (a predicated
forward branch inside it skips the target compares), and spills counted per column loop (innermost) apart from a
persistent program's row loop around it. No compiler needed."""

from __future__ import annotations

from tools import kernel_report as K


def _sass(body: dict[int, str]) -> list[str]:
    """SASS lines as cuobjdump prints them: ``/*addr*/  OP ... ;`` at 16-byte steps."""
    return [f"        /*{addr:04x}*/                   {op} ;" for addr, op in sorted(body.items())]


def _program(*, spill_in_inner: bool, spill_in_outer: bool) -> list[str]:
    ops = {a: "FADD R1, R2, R3" for a in range(0x0000, 0x0200, 0x10)}
    # inner loop 0x0040..0x0100 (13 instructions), a predicated branch at 0x0060 skipping 0x0070..0x00a0 (4)
    ops[0x0060] = "@!P0 BRA 0xb0"
    ops[0x0100] = "@P1 BRA 0x40"
    # outer loop 0x0020..0x0180 around it
    ops[0x0180] = "@P2 BRA 0x20"
    if spill_in_inner:
        ops[0x00c0] = "LDL R4, [R1+0x4]"
    if spill_in_outer:
        ops[0x0140] = "LDL R5, [R1+0x8]"
    ops[0x01a0] = "STL [R1], R6"  # outside every loop: never counted
    return _sass(ops)


def test_loop_sizes_show_the_shortest_path():
    lines = _program(spill_in_inner=False, spill_in_outer=False)
    # outer: 0x20..0x180 = 23 instructions, its branch skips 4 too; inner: 13, shortest 9
    assert K._loop_sizes(lines) == "23/19,13/9"


def test_spills_in_the_column_loop_and_in_the_row_loop_are_told_apart():
    inner = _program(spill_in_inner=True, spill_in_outer=False)
    assert K._loop_spills(inner, innermost=True) == 1 and K._loop_spills(inner, innermost=False) == 0
    outer = _program(spill_in_inner=False, spill_in_outer=True)
    assert K._loop_spills(outer, innermost=True) == 0 and K._loop_spills(outer, innermost=False) == 1


def test_pipelined_loops_are_those_with_async_copies():
    """An innermost loop that loads with LDGSTS is pipelined; one with plain LDG is not; loops without loads and
    loops around others do not count."""
    ops = {a: "FADD R1, R2, R3" for a in range(0x0000, 0x0300, 0x10)}
    ops[0x0100] = "@P1 BRA 0x40"  # inner loop 1: 0x40..0x100
    ops[0x0060] = "LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64]"
    ops[0x0080] = "LDG.E.128 R8, desc[UR4][R6.64]"  # a loop may do both: it holds async copies
    ops[0x0180] = "@P2 BRA 0x20"  # outer loop around it
    ops[0x0240] = "@P3 BRA 0x1c0"  # inner loop 2: 0x1c0..0x240, plain loads
    ops[0x01e0] = "LDG.E R9, desc[UR4][R6.64]"
    ops[0x02c0] = "@P4 BRA 0x2a0"  # a loop without loads
    lines = _sass(ops)
    assert K._pipelined(lines) == ("1/2", "yes")  # the largest loading loop (0x40..0x100) holds the async copies
    ops[0x0060] = "LDG.E.128 R2, desc[UR4][R4.64]"
    assert K._pipelined(_sass(ops)) == ("0/2", "no")
    assert K._pipelined(_sass({0x0: "FADD R1, R2, R3"})) == ("-", "-")

    def compiled(flags, main):
        return K.Compiled("row_loss_forward", flags, 40, 0, 0, {"main loop pipelined": main}, "")

    assert K.not_pipelined(compiled("STAGES=3 num_stages=3", "no"))
    assert not K.not_pipelined(compiled("STAGES=3", "yes"))
    assert not K.not_pipelined(compiled("STAGES=1", "no"))  # asked for no stages: the old loop form
    assert not K.not_pipelined(compiled("SINGLE_TILE STAGES=3", "no"))  # no column loop


def test_sass_per_element_is_the_main_loop_over_a_threads_elements():
    """The largest loading innermost loop's size (and shortest path) over BLOCK_M * BLOCK_N / (32 * num_warps)
    elements a thread; "-" for a whole-row tile (no column loop) or flags without tile sizes."""
    ops = {a: "FADD R1, R2, R3" for a in range(0x0000, 0x0200, 0x10)}
    ops[0x0060] = "@!P0 BRA 0xb0"  # skips 4 of the loop's 13
    ops[0x0080] = "LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64]"
    ops[0x0100] = "@P1 BRA 0x40"
    lines = _sass(ops)
    # 13 and 9 instructions over 1 x 256 / (32 x 4) = 2 elements a thread
    assert K._per_element(lines, "BLOCK_M=1 BLOCK_N=256 STAGES=3 num_warps=4") == "6.5/4.5"
    assert K._per_element(lines, "SINGLE_TILE BLOCK_M=1 BLOCK_N=256 num_warps=4") == "-"
    assert K._per_element(lines, "BLOCK_R=16 BLOCK_C=32") == "-"


def test_loops_over_their_sass_budget_are_reported():
    """``--check``'s budget: the common path's figure (after the slash) against BUDGETS, by case and kernel."""
    def row(name, kernel, figure):
        return name, K.Compiled(kernel, "", 0, 0, 0, {"SASS/element": figure}, "")

    (case, kernel), budget = next(iter(K.BUDGETS.items()))
    assert K.over_budget([row(case, kernel, f"{budget + 5:.1f}/{budget - 0.1:.1f}")]) == []  # the branch is rare
    over = K.over_budget([row(case, kernel, f"{budget + 5:.1f}/{budget + 0.1:.1f}")])
    assert len(over) == 1 and case in over[0] and str(budget) in over[0]
    assert K.over_budget([row(case, kernel, f"{budget + 0.1:.1f}")]) != []  # one figure: the loop has no branch
    assert K.over_budget([row(case, kernel, "-"), row("not-a-budgeted-case", kernel, "99.0")]) == []


def test_whole_row_tiles_are_held_to_their_straight_path():
    """A whole-row tile (SINGLE_TILE: no column loop) counts the instructions outside loops before the first EXIT
    over the elements a thread holds, and ``--check`` holds the budgeted ones to it; other kernels show "-"."""
    ops = {a: "FADD R1, R2, R3" for a in range(0x0000, 0x0200, 0x10)}  # 32 instructions
    ops[0x0080] = "@P1 BRA 0x40"  # a spin wait: 0x40..0x80, 5 instructions, not counted
    ops[0x0100] = "@P0 EXIT"  # the programs that do not reduce the batch end here: 16 - 5 = 11 before it
    lines = _sass(ops)
    # 11 over 1 x 256 / (32 x 4) = 2 elements a thread
    assert K._whole_row_per_element(lines, "SINGLE_TILE BLOCK_M=1 BLOCK_N=256 num_warps=4") == "5.5"
    assert K._whole_row_per_element(lines, "BLOCK_M=1 BLOCK_N=256 num_warps=4") == "-"  # a column loop's kernel

    def row(name, kernel, whole_row):
        return name, K.Compiled(kernel, "", 0, 0, 0, {"SASS/element": "-", "whole-row SASS/element": whole_row},
                                "")

    whole = [(key, b) for key, b in K.BUDGETS.items() if key[0].endswith("-fused") and "8142" in key[0]]
    assert whole, "the iNaturalist whole-row tiles have budgets"
    (case, kernel), budget = whole[0]
    assert K.over_budget([row(case, kernel, f"{budget - 0.1:.1f}")]) == []
    assert K.over_budget([row(case, kernel, f"{budget + 0.1:.1f}")]) != []


def test_performance_gates_hold_from_triton_3_6(monkeypatch):
    """--check's budgets and pipelining were set with triton 3.6 and 3.9; the declared floor (3.4) compiles every
    case but pipelines fewer loops: reported, not failed. Spills and shared memory are checked on every version."""
    for version, gated in (("3.4.0", False), ("3.5.1", False), ("3.6.0", True), ("3.9.0", True),
                           ("3.10.0+git1234", True), ("4.0.0", True)):
        monkeypatch.setattr(K, "_triton_version", lambda v=version: v)
        assert K.performance_gated() is gated, version
