"""benchmarks/error_norm.py: its options, and its table and reading from a result."""

from click.testing import CliRunner

from tests.test_benchmarks_smoke import load


def load_script():
    return load("error_norm")


def test_help_lists_the_options():
    result = CliRunner().invoke(load_script().main, ["--help"])
    assert result.exit_code == 0, result.output
    for option in ("--runs", "--datasets", "--batch-size", "--tol", "--reference-tol",
                   "--repeats", "--quick", "--results", "--no-write"):
        assert option in result.output


def test_table_and_reading_say_both_norms():
    bench = load_script()

    def entry(nfe, seconds, nll, worst):
        return {"nfe": nfe, "seconds_per_batch": seconds, "nll": nll, "status": "success",
                "max_error_log_p": worst, "mean_error_log_p": worst / 10}

    results = {"8gaussians": {"n_test": 5000, "rms": entry(56.0, 0.1, 3.0, 4e-4),
                              "per_sample": entry(64.0, 0.12, 3.0001, 5e-5)}}
    row = bench.table(results)[-1]
    assert row.startswith("| 8gaussians | 5000 | 56.0 / 64.0 (1.14) | 0.10 / 0.12 (1.20) |")
    assert "3.0000 / 3.0001 nats (+1.0e-04)" in row and "4.0e-04 (4e-05) / 5.0e-05" in row
    (text,) = bench.reading(results)
    assert "1.14x to 1.14x" in text and "1.0e-04 nats" in text
    assert "8gaussians 4.0e-04 -> 5.0e-05" in text
