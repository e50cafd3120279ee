"""Timing and reporting helpers shared by the benchmark scripts.

The approach (see benchmarks/solver.py): every timed variant is a
zero-argument callable returning a tuple of tensors, compiled and warmed up
first, then timed interleaved round-robin with the order shuffled every
round, all in one process, so that a machine shared with other work slows
all variants alike. Wall time and the process's CPU time are both
recorded; with one TensorFlow thread the CPU time hardly depends on the
neighbours' load. Reports give medians and ratios.

Scripts import this module as `_timing` (they put their own folder on
sys.path first, so that it also works when a test loads them by path).
"""

import datetime
import math
import os
import platform
import random
import re
import shlex
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import click

# Set on import, before a script imports Keras: the helpers here time
# TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
THREADS_HELP = "TensorFlow intra- and inter-op threads; 0 keeps TensorFlow's default."

# --------------------------------------------------------------------------
# Setup


def common_options(heading, quick, no_write, threads=THREADS_HELP, quick_writes=False):
    """The click options of every benchmark: --quick, --results, --no-write, --threads, --seed.

    `quick` and `no_write` are those options' help, `heading` the section
    that --results updates. threads=None leaves out --threads and --seed,
    for a script whose workers fix their own. quick_writes says in the
    help that a --quick run writes RESULTS.md too (else see publish).
    """
    default = "benchmarks/RESULTS.md" + ("" if quick_writes else "; none with --quick")
    options = [
        click.option("--quick", is_flag=True, help=quick),
        click.option("--results", type=click.Path(dir_okay=False), default=None,
                     help=f"Markdown file to update under '{heading}' (default {default})."),
        click.option("--no-write", is_flag=True, help=no_write),
    ]
    if threads is not None:
        options += [
            click.option("--threads", type=click.IntRange(0), default=1, show_default=True,
                         help=threads),
            click.option("--seed", type=int, default=0, show_default=True),
        ]

    def decorate(command):
        for option in reversed(options):  # the first option listed first in --help
            command = option(command)
        return command
    return decorate


def set_threads(threads):
    """TensorFlow intra- and inter-op threads (0: TensorFlow's default); returns a label."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # retracing and deprecation chatter
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        return threads
    return "TensorFlow's default"


def command_line():
    """The command that started this process, as a person would type it."""
    return "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


# --------------------------------------------------------------------------
# Measuring


def run_once(fn):
    """(wall seconds, process CPU seconds, outputs) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    [o.numpy() for o in out]  # all results on the host: the call has finished
    return time.perf_counter() - wall, time.process_time() - cpu, out


def compile_all(variants):
    """First call of each variant (tracing + compiling); failures recorded.

    Returns (compiled variants, {key: "Error: first line"}, {key: first-call seconds}).
    """
    compiled, failures, compile_s = {}, {}, {}
    for key, fn in variants.items():
        try:
            seconds = run_once(fn)[0]
            run_once(fn)  # a second call: steady state
        except Exception as err:  # noqa: BLE001 - recorded in the report
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            failures[key] = f"{type(err).__name__}: {first[:160]}"
            continue
        compiled[key], compile_s[key] = fn, seconds
    return compiled, failures, compile_s


class Timings:
    """Wall and CPU samples per variant, summarised by medians."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    def add(self, key, wall, cpu):
        self.wall.setdefault(key, []).append(wall)
        self.cpu.setdefault(key, []).append(cpu)

    def __contains__(self, key):
        return key in self.wall

    def get(self, key, metric="wall"):
        samples = (self.wall if metric == "wall" else self.cpu).get(key)
        return statistics.median(samples) if samples else None

    def minimum(self, key):
        return min(self.wall[key]) if key in self.wall else None


def time_interleaved(variants, repeats, seed, timings=None):
    """Times every variant once per round, `repeats` rounds, order shuffled each round."""
    rng = random.Random(seed)
    keys = list(variants)
    timings = Timings() if timings is None else timings
    for _ in range(repeats):
        rng.shuffle(keys)
        for k in keys:
            wall, cpu, _ = run_once(variants[k])
            timings.add(k, wall, cpu)
    return timings


# --------------------------------------------------------------------------
# Reporting


def machine():
    """One line: cores, CPU model, GPUs, Python and TensorFlow versions."""
    import tensorflow as tf

    cpu = platform.processor() or "unknown"
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if found:
            cpu = found.group(1).strip()
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    device = "CPU only"
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        device = f"GPU: {len(gpus)} x {details.get('device_name', 'GPU')}"
    return (f"nproc {os.cpu_count()}, CPU {cpu}, {device}, Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}")


def fmt_ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt_us(seconds):
    return "-" if seconds is None else f"{seconds * 1e6:.0f} us"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def section_head(heading, command, *packages):
    """A section's first lines: heading, date, machine with the `packages`' versions, command."""
    software = ", ".join(f"{p} {version(p)}" for p in packages)
    return [
        heading,
        "",
        f"- Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- Machine: {machine()}" + (f"; {software}" if software else ""),
        f"- Command: `{command}`",
    ]


def publish(section, results, quick, no_write, heading=None):
    """Prints `section` and writes it to --results, by default RESULTS.md but not after --quick."""
    click.echo(section)
    if results is None and not quick:
        results = DEFAULT_RESULTS
    if results and not no_write:
        write_results(results, section, heading)
        click.echo(f"written to {results}", err=True)


def write_results(path, section, heading=None):
    """Replace the section under `heading` in `path`, or append it.

    `heading` defaults to the section's first line (a "## ..." line). Text
    before and after the section, other sections included, is kept.
    """
    heading = heading or section.splitlines()[0].rstrip()
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        nxt = re.search(r"^## ", text[start + len(heading):], re.M)
        end = len(text) if nxt is None else start + len(heading) + nxt.start()
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[end:] if nxt else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def save_figure(fig, path, dpi=100):
    """Lay out `fig`, write it to `path` (its folder made if need be) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def clocked_step(run, step, batch):
    """One training step `step(batch)` (returning a dict with "loss") charged to `run`.

    `run` keeps compile_s, wall, cpu, steps, window and failed: the first
    call's wall time (tracing, XLA compilation) goes to compile_s, off the
    clock; later calls add their wall and process CPU time. Returns the logs.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    logs = step(batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if run.compile_s is None:
        run.compile_s = wall
    else:
        run.wall += wall
        run.cpu += cpu
    run.steps += 1
    run.window.append(logs)
    if not math.isfinite(logs["loss"]):
        run.failed = f"non-finite loss at step {run.steps}"
    return logs
