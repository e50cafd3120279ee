"""How fast the command line answers (issue 15): `rnode --help` and `rnode COMMAND --help`,
with this checkout's package and with an earlier revision's.

Each command runs in a fresh interpreter, `python -c "from keras_rnode.cli
import main; main()" ARGS`, importing this checkout's keras_rnode or the one
of --before REV (its keras_rnode/ folder taken out with `git archive`),
with TF_CPP_MIN_LOG_LEVEL unset as a user's shell has it. The runs are
interleaved in rounds, the order shuffled every round; the report gives
medians of the wall time and of the child's CPU time (user + system), and
how many lines of TensorFlow's C++ logging (oneDNN, CUDA, absl) it printed.
Run `python benchmarks/cli_startup.py --help`.
"""

import os
import random
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# _timing, also when loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402

import _timing  # noqa: E402

HEADING = "## Command line start-up (issue 15)"
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["train", "--help"], ["evaluate", "--help"], ["sample", "--help"],
            ["export", "--help"])
NOISE = ("I0000", "W0000", "E0000", "absl::", "oneDNN", "cuda")
LAUNCH = "import sys; sys.path.insert(0, sys.argv.pop(1)); from keras_rnode.cli import main; main()"


def run_once(source, args):
    """(wall s, CPU s, noise lines) of one command run against the package in `source`."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCH, str(source), *args], env=env,
                          capture_output=True, text=True, cwd=source)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise click.ClickException(f"{args} failed against {source}: {proc.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    noise = sum(any(w in line for w in NOISE)
                for line in (proc.stdout + proc.stderr).splitlines())
    return wall, cpu, noise


def extract(revision, into):
    """The keras_rnode/ folder of `revision`, under `into`."""
    archive = subprocess.run(["git", "archive", revision, "keras_rnode"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    return into


@click.command()
@click.option("--before", "revision", default="b0d3ffe", show_default=True,
              help="The revision to compare with (the last one whose CLI imported keras first).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Runs of each command with each package.")
@_timing.common_options(HEADING, quick="Smoke run: one round.", no_write="Print only.",
                        threads=None)
def main(revision, repeats, quick, results, no_write):
    """Time `rnode --help` and each command's --help, now and at --before."""
    repeats = 1 if quick else repeats
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"before": extract(revision, Path(tmp)), "now": ROOT}
        runs = [(version, tuple(args)) for version in sources for args in COMMANDS]
        wall, cpu, noise = {}, {}, {}
        for _ in range(repeats):
            rng.shuffle(runs)
            for version, args in runs:
                w, c, n = run_once(sources[version], args)
                wall.setdefault((version, args), []).append(w)
                cpu.setdefault((version, args), []).append(c)
                noise[version, args] = n
    lines = _timing.section_head(HEADING, _timing.command_line())
    lines += [
        f"- Each: `python -c \"from keras_rnode.cli import main; main()\" ARGS` in a fresh "
        f"interpreter, against this checkout's package (now) and revision {revision}'s "
        f"(before); medians of {repeats} interleaved runs, wall and the child's CPU time; "
        "noise: lines of TensorFlow's C++ logging in the output.",
        "",
        "| command | before: wall s | before: CPU s | now: wall s | now: CPU s | before / now "
        "(wall) | noise lines before / now |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for args in map(tuple, COMMANDS):
        b, n = statistics.median(wall["before", args]), statistics.median(wall["now", args])
        lines.append(f"| `rnode {' '.join(args)}` | {b:.2f} | "
                     f"{statistics.median(cpu['before', args]):.2f} | {n:.2f} | "
                     f"{statistics.median(cpu['now', args]):.2f} | {b / n:.1f} | "
                     f"{noise['before', args]} / {noise['now', args]} |")
    _timing.publish("\n".join(lines) + "\n", results, quick, no_write)


if __name__ == "__main__":
    main()
