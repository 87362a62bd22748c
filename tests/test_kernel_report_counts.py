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
