"""The solver benchmark script runs, and updates RESULTS.md without clobbering it."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "solver.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_solver", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_lists_the_options():
    result = CliRunner().invoke(load_script().main, ["--help"])
    assert result.exit_code == 0, result.output
    for option in ("--repeats", "--batch", "--quick", "--results"):
        assert option in result.output


def test_write_results_replaces_only_its_own_section(tmp_path):
    bench = load_script()
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Other\n\nkeep me\n\n"
                    f"{bench.HEADING}\n\nold table\n\n## Later\n\nkeep me too\n")
    bench.write_results(path, f"{bench.HEADING}\n\nnew table\n")
    text = path.read_text()
    assert "old table" not in text and "new table" in text
    assert "keep me\n" in text and "keep me too" in text
    assert text.index("## Other") < text.index(bench.HEADING) < text.index("## Later")

    fresh = tmp_path / "fresh.md"
    bench.write_results(fresh, f"{bench.HEADING}\n\nfirst\n")
    bench.write_results(fresh, f"{bench.HEADING}\n\nsecond\n")
    assert fresh.read_text().count(bench.HEADING) == 1
    assert "second" in fresh.read_text() and "first" not in fresh.read_text()


@pytest.mark.slow
def test_quick_run_exits_zero_and_writes_the_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert "## Solver (issue 2)" in text
    assert "| ours | xla | forward |" in text
    assert "overhead ratio" in text
