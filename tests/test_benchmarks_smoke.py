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


# --------------------------------------------------------------------------
# Issue 5: the CNF step, RNODE vs unregularized, and the GPU script

BENCH = ROOT / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, options", [
    ("cnf_step", ("--repeats", "--batch", "--steps", "--tfp-xla", "--quick", "--results")),
    ("rnode_vs_ffjord", ("--datasets", "--digits", "--budget-s", "--clock", "--eval-every",
                         "--quick", "--out", "--results")),
    ("step_profile", ("--repeats", "--batch", "--tol", "--quick", "--results")),
])
def test_issue5_scripts_list_their_options(name, options):
    result = CliRunner().invoke(load(name).main, ["--help"])
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output
    assert "--scaling-worker" not in result.output  # internal


def test_shared_write_results_takes_the_heading_from_the_section(tmp_path):
    timing = load("_timing")
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## A\n\nold a\n\n## B\n\nold b\n")
    timing.write_results(path, "## A\n\nnew a\n")
    text = path.read_text()
    assert "new a" in text and "old a" not in text and "old b" in text


def test_time_to_target_and_ratios():
    bench = load("rnode_vs_ffjord")

    class FakeRun(bench.Run):
        def __init__(self, records):
            self.records, self.steps, self.wall, self.cpu = records, 10, 100.0, 90.0
            self.compile_s, self.failed = 5.0, None

    def rec(t, nll, nfe):
        # Real records carry the step too; here one step a second, CPU time half of it.
        return {"step": t, "wall_s": t, "cpu_s": t / 2, "nll": nll, "nfe_forward": nfe,
                "nfe_backward": nfe, "eval_nfe": nfe}

    runs = {
        "rnode": FakeRun([rec(0, 5.0, 20), rec(20, 3.1, 20), rec(100, 3.0, 20)]),
        "unregularized": FakeRun([rec(0, 5.0, 20), rec(50, 3.3, 40), rec(80, 3.05, 50),
                                  rec(100, 3.04, 60)]),
    }
    s = bench.summarize("8gaussians", runs, 0.05, "wall")
    assert s["target"] == pytest.approx(3.09)
    assert s["t_rnode"] == 100 and s["t_unreg"] == 80  # rnode's 3.1 at 20 s misses 3.09
    assert s["time_ratio"] == pytest.approx(0.8)
    assert s["nfe_ratio"] == pytest.approx(3.0)
    assert s["models"]["rnode"]["step_ms"] == pytest.approx(1e3 * 100.0 / 9)
    assert bench.first_time_within(runs["rnode"].records, 1.0, "wall") is None

    # On the CPU clock the times are read from cpu_s: the same ratios, half the times.
    c = bench.summarize("8gaussians", runs, 0.05, "cpu")
    assert c["t_rnode"] == 50 and c["t_unreg"] == 40
    assert c["budget_ratio"] == pytest.approx(s["budget_ratio"])
    assert c["models"]["rnode"]["step_ms"] == pytest.approx(1e3 * 90.0 / 9)


def test_step_profile_parts_add_up_to_the_step():
    bench = load("step_profile")
    cpu = {"network": 0.012, "augmented": 0.018, "adjoint": 0.048,  # loops of 24 evaluations
           "forward solve": 0.040, "step": 0.160}
    rows, per = bench.breakdown(cpu, 50, 62, 24, 24)
    parts = dict(rows)
    assert per["network"] == pytest.approx(0.0005) and per["adjoint"] == pytest.approx(0.002)
    assert sum(parts.values()) == pytest.approx(cpu["step"])
    assert list(parts.values())[0] == pytest.approx(50 * 0.0005)  # forward NFE x one network call
    assert list(parts.values())[3] == pytest.approx(62 * 0.002)   # backward NFE x one adjoint call
    assert list(parts.values())[2] == pytest.approx(0.040 - 50 * 0.00075)


def test_plot_curves_draws_every_data_set(tmp_path):
    import json

    bench = load("plot_curves")
    paths = []
    for name in ("8gaussians", "digits"):
        rows = [{"config": {"clock": "cpu"}}]
        rows += [{"dataset": name, "model": m, "step": 10 * i, "wall_s": 2.0 * i,
                  "cpu_s": 1.0 * i, "nll": 4.0 - 0.1 * i, "nfe_forward": 20 + i}
                 for i in range(6) for m in ("rnode", "unregularized")]
        rows.append({"summary": {"target": 3.6}})
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        paths.append(str(path))
    out = tmp_path / "headline.png"
    result = CliRunner().invoke(bench.main, [*paths, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"config": {}}))
    result = CliRunner().invoke(bench.main, [str(empty), "--out", str(out)])
    assert result.exit_code != 0 and "no training records" in result.output


def _run(args, timeout=900):
    proc = subprocess.run([*args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_cnf_step_quick_run_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    _run([sys.executable, str(BENCH / "cnf_step.py"), "--quick", "--no-tfp-xla",
          "--results", str(results)])
    text = results.read_text()
    assert "## CNF training step (issue 5)" in text
    assert "| ours | xla |" in text and "| tfp | graph |" in text
    assert "direct - adjoint [MiB]" in text and "failed" not in text


@pytest.mark.slow
def test_rnode_vs_ffjord_quick_run_writes_records_plot_and_section(tmp_path):
    import json

    results = tmp_path / "RESULTS.md"
    _run([sys.executable, str(BENCH / "rnode_vs_ffjord.py"), "--quick", "--datasets",
          "8gaussians", "--budget-s", "3", "--out", str(tmp_path), "--results", str(results)])
    rows = [json.loads(line) for line in (tmp_path / "8gaussians.jsonl").read_text().splitlines()]
    records = [r for r in rows if "model" in r]
    assert {r["model"] for r in records} == {"rnode", "unregularized"}
    assert all(r["nfe_forward"] > 0 and r["nll"] == r["nll"] for r in records)
    assert "summary" in rows[-1]
    assert (tmp_path / "8gaussians.png").stat().st_size > 10_000
    assert "## RNODE vs unregularized (issue 5)" in results.read_text()


@pytest.mark.slow
def test_step_profile_quick_run_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    _run([sys.executable, str(BENCH / "step_profile.py"), "--quick", "--results", str(results)])
    text = results.read_text()
    assert "## Where a CNF training step's time goes (issue 5)" in text
    assert "| **whole step** |" in text and "adjoint evaluations" in text



@pytest.mark.slow
def test_conditional_quick_run_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    _run([sys.executable, str(BENCH / "conditional.py"), "--quick", "--results", str(results)])
    text = results.read_text()
    assert "## Conditional flows: NLL given the label" in text
    assert text.count("| 2 |") == 1 and text.count("| 4 |") == 1


DIFFRAX_AGAINST_OURS = """
import sys
sys.path.insert(0, "benchmarks")
import keras, numpy as np
import keras_rnode as kr
from keras_rnode.datasets import toy
from diffrax_cnf import diffrax_step
x = toy("8gaussians", 256, seed=0)
cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(16, 16)), trace="exact")
model = kr.RNODE([cnf], kinetic=0.01, jacobian=0.01)
model.build(x.shape)
rng = np.random.default_rng(0)
for v in cnf.dynamics.trainable_variables:  # nothing zeroed: a flow that moves
    v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
model.compile(optimizer=keras.optimizers.SGD(0.0))
print(float(model.train_on_batch(x, return_dict=True)["loss"]),
      diffrax_step(cnf.dynamics, x, trace="exact")()[0],
      diffrax_step(cnf.dynamics, x, trace="hutchinson")()[0])
"""


@pytest.mark.slow
def test_the_diffrax_peer_solves_our_cnf_to_our_loss():
    """benchmarks/diffrax_cnf.py, the peer of backends.py and gpu_bench.py, is the same
    problem: its exact-trace loss is ours at the same weights, its Hutchinson one close."""
    import os

    pytest.importorskip("diffrax")
    proc = subprocess.run([sys.executable, "-c", DIFFRAX_AGAINST_OURS], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, KERAS_BACKEND="jax"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, exact, hutchinson = map(float, proc.stdout.split()[-3:])
    assert abs(exact - ours) <= 1e-5 * abs(ours)
    assert abs(hutchinson - ours) < 0.05


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu.sh --cpu --quick (JAX on the CPU, tiny sizes): every part of the GPU
    run comes back and the table is written (issue 16)."""
    import json
    import os

    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--cpu", "--quick",
                           "--budget-s", "400"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert "failed" not in kinds, rows
    assert any(r["kind"] == "check" and r["ok"] for r in rows)
    impls = {r["impl"] for r in rows if r["kind"] == "toy"}
    assert "keras-rnode (JAX, XLA)" in impls and "diffrax (JAX, jit)" in impls, impls
    assert "PyTorch + torchdiffeq reference" in impls, impls
    mnist = [r for r in rows if r["kind"] == "mnist"]
    assert {r["backend"] for r in mnist} == {"jax", "torch"}
    # Flow matching beside likelihood on the same single-scale model, both backends.
    single = {(r["backend"], r["objective"]) for r in mnist if r["model"] == "single-scale"}
    assert single == {(b, o) for b in ("jax", "torch")
                      for o in ("likelihood", "flow_matching", "flow_matching_ot")}
    assert all(r["nfe"] == 0 for r in mnist if r["objective"] != "likelihood")
    digits = [r for r in rows if r["kind"] == "digits"]
    assert {r["model"] for r in digits} == {"RNODE", "unregularized"}
    assert max(r["step"] for r in digits) > 0
    text = (tmp_path / "gpu.md").read_text()
    assert "### 1. The 2-D training step" in text and "Check: CPU" in text


# --------------------------------------------------------------------------
# Issue 17: learning per step, keras-rnode against the PyTorch reference


def test_plateau_lists_its_options():
    result = CliRunner().invoke(load("plateau").main, ["--help"])
    assert result.exit_code == 0, result.output
    for option in ("--datasets", "--sides", "--init", "--steps", "--eval-every", "--quick",
                   "--out", "--plot-only", "--across"):
        assert option in result.output


@pytest.mark.slow
def test_plateau_quick_run_writes_records_and_figure(tmp_path):
    import json
    import math

    pytest.importorskip("torchdiffeq")
    _run([sys.executable, str(BENCH / "plateau.py"), "--quick", "--out", str(tmp_path)])
    rows = [json.loads(line)
            for line in (tmp_path / "plateau_8gaussians.jsonl").read_text().splitlines()]
    records = [r for r in rows if "side" in r]
    assert {r["side"] for r in records} == {"keras", "torch"}
    assert all(math.isfinite(r["nll"]) and r["eval_nfe"] > 0 for r in records)
    trained = [r for r in records if r["step"] > 0]
    assert all(r["nfe_forward"] > 0 for r in trained)
    assert all(r["nfe_backward"] > 0 for r in trained if r["side"] == "torch")
    summary = rows[-1]["summary"]
    assert summary["target"] == 3.0 and set(summary["sides"]) == {"keras", "torch"}
    assert (tmp_path / "plateau.png").stat().st_size > 10_000


def test_plateau_across_seeds_reads_steps_ratios_and_the_paired_gap(tmp_path):
    import json

    def write(tag, seed, keras, torch):
        rows = [{"config": {"seed": seed, "targets": {"8gaussians": 3.0}}}]
        for side, curve in (("keras", keras), ("torch", torch)):
            rows += [{"side": side, "step": 100 * i, "nll": nll, "wall_s": 10.0 * i,
                      "cpu_s": 8.0 * i} for i, nll in enumerate(curve)]
        (tmp_path / f"plateau{tag}_8gaussians.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n")

    # keras reaches 3.0 at step 200 with 20 s (wall), torch at 300 with 30 s;
    # shared evaluations 100, 200: (3.5 - 3.7 + 2.9 - 3.2) / 2 = -0.25 nats
    write("", 0, [5.0, 3.5, 2.9], [5.0, 3.7, 3.2, 2.95])
    # seeds where keras never gets there, and then neither side: gaps +0.125, +0.2
    write("_s1", 1, [5.0, 3.6, 3.1], [5.0, 3.5, 2.95])
    write("_s2", 2, [5.0, 3.6, 3.4], [5.0, 3.5, 3.1])
    result = CliRunner().invoke(load("plateau").main,
                                ["--across", ", _s1,_s2", "--datasets", "8gaussians",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "| 8gaussians | 0 | 200 | 300 | 0.67x | 0.67x | 0.67x | -0.250 |" in lines
    assert "| 8gaussians | 1 | not reached | 200 | not reached | not reached | not reached " \
        "| +0.125 |" in lines
    assert "| 8gaussians | 2 | not reached | not reached | - | - | - | +0.200 |" in lines
    # a miss counts as infinitely many steps: the median of 200, inf, inf is a miss
    assert "| 8gaussians | median | not reached | 300 | - | - | - | +0.125 |" in lines
    assert (tmp_path / "plateau_across.png").stat().st_size > 10_000

    missing = CliRunner().invoke(load("plateau").main, ["--across", "_s1,_s9", "--datasets",
                                                        "8gaussians", "--out", str(tmp_path)])
    assert missing.exit_code != 0 and "no record plateau_s9_8gaussians.jsonl" in missing.output


# --------------------------------------------------------------------------
# Issue 25: flow matching against likelihood training and torchcfm


def test_flow_matching_lists_its_options():
    result = CliRunner().invoke(load("flow_matching").main, ["--help"])
    assert result.exit_code == 0, result.output
    for option in ("--datasets", "--methods", "--budget-s", "--fm-share", "--switch-share",
                   "--sigma", "--clock", "--jax", "--quick", "--out"):
        assert option in result.output
    assert "--jax-worker" not in result.output  # internal


def test_flow_matching_evaluates_on_a_growing_schedule():
    import numpy as np

    bench = load("flow_matching")
    steps = [0]
    while steps[-1] < 3000:
        steps.append(bench.next_eval(steps[-1], 50))
    gaps = np.diff(steps)
    assert steps[:3] == [0, 50, 100] and all(g % 50 == 0 for g in gaps)
    assert list(gaps) == sorted(gaps) and gaps[-1] == 250  # a tenth of ~2500, rounded down


def test_flow_matching_goals_judge_the_records():
    bench = load("flow_matching")

    class FakeRun:
        def __init__(self, rows, wall, cpu):
            self.records = [{"step": s, "wall_s": t, "cpu_s": t, "nll": nll, "eval_nfe": nfe,
                             "kinetic": k, "status": "success"} for s, t, nll, nfe, k in rows]
            self.steps, self.wall, self.cpu, self.failed, self.compile_s = \
                rows[-1][0], wall, cpu, None, 1.0
            self.step_wall = self.step_cpu = [0.01, 0.02, 0.03]

    def summary(rnode_rows):
        runs = {
            "rnode": FakeRun(rnode_rows, 100.0, 100.0),
            "fm": FakeRun([(0, 0, 6.0, 40, 0.0), (100, 2, 3.5, 300, 2.0), (200, 4, 3.2, 500, 2.5)],
                          4, 4),
            "fm_ot": FakeRun([(0, 0, 6.0, 40, 0.0), (100, 5, 3.2, 150, 1.5),
                              (200, 9, 2.99, 200, 1.6)], 9, 9),
            "fm_ot_ft": FakeRun([(100, 5, 3.2, 150, 1.5), (150, 20, 2.9, 90, 1.2)], 20, 20),
        }
        return bench.summarize("8gaussians", runs, None,
                               {"clock": "cpu", "budgets": {"8gaussians": 100.0},
                                "fm_share": 0.5})

    s = summary([(0, 0, 6.0, 40, 0.0), (500, 50, 3.1, 80, 1.0), (900, 90, 2.95, 80, 1.0)])
    m, g = s["methods"], s["goals"]
    assert m["fm_ot"]["target_step"] == 200 and m["fm_ot"]["target_cpu_s"] == 9
    assert m["fm"]["target_step"] is None and m["rnode"]["ms_step_cpu"] == pytest.approx(20.0)
    assert m["rnode"]["nll_at_budget"] == 3.1  # the last evaluation within 0.5 x 100 s
    assert g["fm_ot_tenth"]["met"] and "0.10x" in g["fm_ot_tenth"]["text"]  # 9 s of 90 s
    assert g["fm_ot_quarter"]["met"]
    assert g["ot_straighter_ours"]["met"]  # step 200: 200 NFE < 500, kinetic 1.6 < 2.5
    # The fine-tune ends at 2.9 with 90 NFE (1.12x RNODE's 80) after 20 s (0.22x of 90 s).
    assert g["finetune"]["met"], g["finetune"]["text"]

    # RNODE never reaches 3.0: the ratios are bounds against its whole 100 s.
    s = summary([(0, 0, 6.0, 40, 0.0), (900, 90, 3.05, 60, 1.0)])
    assert s["methods"]["rnode"]["target_step"] is None
    assert s["goals"]["fm_ot_tenth"]["met"] and "< 0.09x" in s["goals"]["fm_ot_tenth"]["text"]
    assert not s["goals"]["finetune"]["met"]  # 90 NFE is 1.5x RNODE's 60


@pytest.mark.slow
def test_flow_matching_quick_run_writes_records_figure_and_section(tmp_path):
    import json
    import math

    results = tmp_path / "RESULTS.md"
    _run([sys.executable, str(BENCH / "flow_matching.py"), "--quick", "--out", str(tmp_path),
          "--results", str(results)])
    rows = [json.loads(line)
            for line in (tmp_path / "flow_matching_8gaussians.jsonl").read_text().splitlines()]
    records = [r for r in rows if "method" in r]
    methods = {r["method"] for r in records}
    ours = {"rnode", "fm", "fm_ot", "fm_ot_ft", "fm_ot_softplus"}
    assert ours <= methods
    if load("flow_matching").have_torchcfm():
        assert {"cfm", "otcfm"} <= methods
    assert all(math.isfinite(r["nll"]) and r["eval_nfe"] > 0 and r["kinetic"] >= 0
               and r["status"] == "success" for r in records)
    # The fine-tune starts from an FM-OT evaluation past the switch, with FM-OT's clock.
    config = rows[0]["config"]
    ft = [r for r in records if r["method"] == "fm_ot_ft"]
    inherited = [r for r in ft if r.get("inherited")]
    fm_ot = [r for r in records if r["method"] == "fm_ot"]
    assert [(r["step"], r["cpu_s"]) for r in inherited] == \
        [(r["step"], r["cpu_s"]) for r in fm_ot[:len(inherited)]]
    switch = config["switch_share"] * config["fm_share"] * config["budgets"]["8gaussians"]
    own = ft[len(inherited):]
    assert inherited[-1]["cpu_s"] >= switch and own and own[-1]["cpu_s"] > inherited[-1]["cpu_s"]
    assert own[-1]["step"] > inherited[-1]["step"]
    summary = rows[-1]["summary"]
    assert summary["target"] == 3.0 and set(summary["methods"]) == methods
    assert {"fm_ot_tenth", "fm_ot_quarter", "finetune"} <= set(summary["goals"])
    assert (tmp_path / "flow_matching.png").stat().st_size > 10_000
    steps = [json.loads(line) for line in
             (tmp_path / "flow_matching_steps.jsonl").read_text().splitlines()[1:]]
    variants = {r["variant"] for r in steps}
    assert "ours ot, concatsquash, TF graph" in variants
    assert any(v.startswith("OT alone, ours") for v in variants)
    assert all(r["ms_cpu"] > 0 for r in steps)
    text = results.read_text()
    assert "## Flow matching (issue 25)" in text and "| data set | method | steps |" in text
    assert "Goals (issue 25)" in text and "| variant | CPU ms | wall ms |" in text
