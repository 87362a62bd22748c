"""Smoke tests of ``fastlt demo`` (a quick run of a few seconds) and of the ``fastlt`` command line."""

from __future__ import annotations

import math
import sys
import types

import pytest

pytest.importorskip("sklearn")

import fastlt  # noqa: E402
from fastlt.cli import main  # noqa: E402
from fastlt.demo import METHODS, run_demo  # noqa: E402

METRICS = ("overall", "balanced", "many", "medium", "few")


@pytest.fixture(scope="module")
def quick_rows():
    return run_demo(quick=True, progress=False)


def test_every_method_has_metrics_in_unit_interval(quick_rows):
    assert list(quick_rows) == list(METHODS)
    for name, row in quick_rows.items():
        for key in METRICS:
            value = row[key]
            assert isinstance(value, float), (name, key)
            assert math.isnan(value) or 0.0 <= value <= 1.0, (name, key, value)
        assert not math.isnan(row["overall"]) and not math.isnan(row["balanced"]), name
        assert row["time_s"] >= 0.0


def test_quick_run_is_repeatable(quick_rows):
    again = run_demo(quick=True, progress=False)
    for name in METHODS:
        for key in METRICS:
            a, b = quick_rows[name][key], again[name][key]
            assert (math.isnan(a) and math.isnan(b)) or a == b, (name, key, a, b)


def test_balanced_test_set_gives_equal_overall_and_balanced(quick_rows):
    # The held-out test set has the same number of images per class.
    for row in quick_rows.values():
        assert row["overall"] == pytest.approx(row["balanced"], abs=1e-12)


def test_la_loss_and_balanced_softmax_coincide(quick_rows):
    # tau = 1 logit adjustment is Balanced Softmax: same init, batches and loss give the same model.
    for key in METRICS:
        assert quick_rows["LA loss"][key] == quick_rows["Balanced Softmax"][key]


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        run_demo(epochs=0, progress=False)
    with pytest.raises(ValueError):
        run_demo(imbalance_ratio=0.5, quick=True, progress=False)
    with pytest.raises(ValueError, match="seed"):
        run_demo(seed=2**64, quick=True, progress=False)
    with pytest.raises(ValueError, match="seed"):  # its streams are seeded with seed + 1 ... seed + 4
        run_demo(seed=2**64 - 1, quick=True, progress=False)


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--imbalance-ratio", "0.5"], ["--imbalance-ratio", "nan"],
                                  ["--seed", "99999999999999999999"], ["--seed", str(-(2**63) - 1)]])
def test_cli_demo_bad_values_are_usage_errors(argv, capsys):
    """Out-of-range option values exit 2 with argparse's message naming the option, not a traceback."""
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}" in err and "Traceback" not in err


def test_cli_demo_quick_prints_the_table(capsys):
    assert main(["demo", "--quick", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "imbalance ratio 100" in out
    assert "train counts per class: [" in out
    header = next(line for line in out.splitlines() if line.startswith("Method"))
    for column in ("Overall", "Balanced", "Many", "Medium", "Few", "Time (s)"):
        assert column in header
    for name in METHODS:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastlt {fastlt.__version__}"


def test_cli_without_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_cli_bench_passes_every_argument_on(monkeypatch):
    seen = []
    fake = types.ModuleType("fastlt.bench")
    fake.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fastlt.bench", fake)
    monkeypatch.setattr(fastlt, "bench", fake, raising=False)
    assert main(["bench", "--loss", "la", "-h"]) == 0
    assert seen == [["--loss", "la", "-h"]]


def test_cli_bench_missing_module_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastlt.bench", None)  # makes the import fail as if absent
    monkeypatch.delattr(fastlt, "bench", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 2
    assert "fastlt.bench is not available" in capsys.readouterr().err


@pytest.mark.parametrize("blocked, package", [("sklearn", "scikit-learn"), ("tqdm", "tqdm")])
def test_cli_demo_without_its_extra_is_one_line(monkeypatch, capsys, blocked, package):
    """Without the ``[demo]`` extra (scikit-learn, tqdm) ``fastlt demo`` prints one line naming the package and the
    extra, exit status 1 (a chained traceback before)."""
    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # makes the import fail as if absent
    monkeypatch.setitem(sys.modules, blocked + (".datasets" if blocked == "sklearn" else ".auto"), None)
    assert main(["demo", "--quick"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastlt demo: error: the demo needs {package} (pip install 'fastlt[demo]')"]



def test_cli_interrupted_or_cut_off_exits_without_a_traceback(monkeypatch, capsys):
    """Ctrl-C exits 130 with one line, and a reader that goes away (``fastlt demo | head -1``) ends the command
    quietly: both printed a traceback."""
    import subprocess

    import fastlt.demo

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastlt.demo, "run_from_args", interrupted)
    assert main(["demo", "--quick"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    code = ("import fastlt.demo, fastlt.cli\n"
            "def cut_off(args):\n"
            "    raise BrokenPipeError\n"
            "fastlt.demo.run_from_args = cut_off\n"
            "raise SystemExit(fastlt.cli.main(['demo', '--quick']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
