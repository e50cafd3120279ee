"""The README's bash blocks run as written, in order, on a fresh copy of the checkout.

Every command of every ```bash block is read (continuation lines joined,
comments dropped, `a && b` as two commands). Those the test cannot run
are skipped by a rule of SKIPPED, which says why; a command no rule covers
and that is neither `rnode ...` nor `python scripts/....py ...` fails the
test, so a new one needs a rule or must run. The fast checks parse every
`rnode` and script command (each flag exists, each value is valid) and
check that a run directory is made before a command reads it and that
everything written lands where git ignores it; the slow one runs the
commands, with a few cheap training options added to each `rnode train`
and recipe (SHORT: the README's runs take minutes to hours).
"""

import importlib.util
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from keras_rnode.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("scripts/evaluate_bpd.py", "scripts/recipes.py")

# (pattern, why): a command matching a pattern is not run.
SKIPPED = (
    (r"^pip install\b", "installs the package: the test runs where it is installed"),
    (r"^(KERAS_BACKEND=\S+ )?pytest\b", "runs the test suite, of which this test is part"),
    (r"^TF_CONFIG=", "needs a cluster (tests/test_multiworker.py runs it on one machine)"),
    (r"^bash benchmarks/gpu\.sh|^OUT=\S+ bash benchmarks/gpu\.sh",
     "the GPU benchmark (tests/test_benchmarks_smoke.py runs its CPU smoke run)"),
    (r"^(?!.*--dry-run).*\b(mnist|cifar10)\b", "downloads MNIST or CIFAR-10"),
)
# Added to every `rnode train` that starts a run, and to a recipe after `--`: last wins.
SHORT = ["--hidden", "8,8", "--steps", "2", "--batch-size", "64", "--n-train", "256",
         "--n-test", "64", "--method", "rk4", "--step-size", "0.5", "--eval-method", "rk4",
         "--eval-step-size", "0.5", "--eval-batch-size", "64", "--quiet"]
RECIPE_SHORT = ["--steps", "2", "--hidden", "8", "--batch-size", "16", "--n-test", "16",
                "--eval-method", "rk4", "--eval-step-size", "0.5", "--quiet"]


def commands():
    """[(text, tokens, why skipped or None)] of the README's bash blocks, in order."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                text = " ".join(tokens[:cut])
                why = next((why for pattern, why in SKIPPED if re.search(pattern, text)), None)
                out.append((text, tokens[:cut], why))
                tokens = tokens[cut + 1:]
    return out


def script(path):
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def target(tokens):
    """(click command, its arguments, name) of an `rnode` or script command, leading
    VAR=value settings aside; None for any other."""
    while tokens and re.match(r"\w+=", tokens[0]):
        tokens = tokens[1:]
    if tokens[0] == "rnode":
        return main, tokens[1:], tokens[1]
    if tokens[0] == "python" and len(tokens) > 1 and tokens[1] in SCRIPTS:
        return script(tokens[1]).main, tokens[2:], tokens[1]
    return None


def parse(command, args):
    """The parsed parameters of `command args`: a bad flag or value raises click's error."""
    if hasattr(command, "commands"):  # the rnode group
        command, args = command.commands[args[0]], args[1:]
    with command.make_context(command.name, list(args)) as ctx:
        return ctx.params


def test_every_command_runs_or_is_skipped_by_a_rule():
    listed = commands()
    assert len([c for c in listed if c[2] is None]) >= 10, listed
    for text, tokens, why in listed:
        assert why is not None or target(tokens) is not None, f"no rule for: {text}"


def test_every_rnode_and_script_command_parses():
    """Every flag exists and every value is valid, in skipped commands too."""
    recipes = script("scripts/recipes.py")
    for text, tokens, _ in commands():
        found = target(tokens)
        if found is None:
            continue
        command, args, name = found
        params = parse(command, args)
        if name == "scripts/recipes.py":  # and the `rnode train` line it runs
            parse(main, ["train", *recipes.recipe_args(params["recipe"], params["out"],
                                                       params["devices"], params["jit"],
                                                       params["extra"])])


def runs_made_and_read():
    """[(command, run dirs it reads, paths it writes)] of the commands that are run."""
    out = []
    for text, tokens, why in commands():
        if why is not None:
            continue
        command, args, name = target(tokens)
        params = parse(command, args)
        reads, writes = [], []
        if name == "train":
            out_dir = params["out"] or f"runs/{params['dataset']}"
            (reads if params["resume"] else writes).append(out_dir)
        elif name in ("evaluate", "sample", "export", "scripts/evaluate_bpd.py"):
            reads.append(params.get("run_dir") or params.get("model_path"))
            if name == "sample":
                writes.append(params["out"])
            if name == "export":
                writes.append(params["out"] or f"{params['run_dir']}/saved_model")
        elif name == "scripts/recipes.py" and not params["dry_run"]:
            writes.append(params["out"] or f"runs/{params['recipe']}")
        out.append((text, reads, writes))
    return out


def test_runs_are_made_before_they_are_read_and_written_where_git_ignores_them():
    made = set()
    for text, reads, writes in runs_made_and_read():
        for run in reads:
            assert run in made, f"{text}: no command before it makes {run}"
        for path in writes:
            assert path not in made or "--overwrite" in text, f"{text}: {path} exists"
        made |= set(writes)
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = sorted(made)
    ignored = subprocess.run(["git", "check-ignore", "--", *paths], cwd=ROOT, text=True,
                             capture_output=True).stdout.split()
    assert ignored == paths, f"written where git does not ignore it: {set(paths) - set(ignored)}"


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, text=True, capture_output=True,
                          check=True).stdout


@pytest.mark.slow  # 2 minutes on 2 shared cores: a dozen tiny runs, evaluations, an export
def test_the_readme_runs_in_order_on_a_fresh_copy(tmp_path, monkeypatch):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    copy = tmp_path / "checkout"
    for name in git("ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).split():
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    git("init", "-q", cwd=copy)
    git("add", "-A", cwd=copy)
    git("-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m",
        "the checkout", cwd=copy)
    monkeypatch.chdir(copy)
    for text, tokens, why in commands():
        if why is not None:
            continue
        command, args, name = target(tokens)
        if name == "train" and "--resume" not in args:
            args = [a for i, a in enumerate(args)
                    if a != "--epochs" and (i == 0 or args[i - 1] != "--epochs")] + SHORT
        elif name == "scripts/recipes.py" and "--dry-run" not in args:
            args = [*args, *([] if "--" in args else ["--"]), *RECIPE_SHORT]
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 0, f"{text}\n{result.output}"
    assert git("status", "--porcelain", cwd=copy) == "", "the README wrote into the checkout"
