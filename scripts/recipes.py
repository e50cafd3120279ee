"""The paper's training recipes as `rnode train` command lines.

    python scripts/recipes.py digits --out runs/digits-ms            # minutes on a laptop CPU
    python scripts/recipes.py mnist --out runs/mnist --devices 4 --jit
    python scripts/recipes.py cifar10 --out runs/cifar10 --devices 8 --jit
    python scripts/recipes.py mnist --dry-run                        # print the command line
    python scripts/recipes.py digits --out runs/d -- --steps 2 --hidden 8   # override options

Each recipe is a list of `rnode train` options (see RECIPES); anything after
`--` is appended and wins over the recipe's own value. All three use FFJORD's
multiscale architecture (two CNF blocks before and two after each squeeze,
3x3 conv dynamics with 64 channels and softplus, logit transform first) and
lambda_K = lambda_J = 0.01 (Finlay et al., ICML 2020):

- mnist: train with RK4 at step 0.25, evaluate with dopri5 at rtol = atol =
  1e-5; batch 200; Adam 1e-3 with 1000 warm-up steps.
- cifar10: as mnist, but dopri5 at 1e-5 in training too.
- digits: scikit-learn's 8x8 digits, the small recipe: the mnist settings
  with 32-channel dynamics, 100 warm-up steps and 500 steps.

The paper's epoch counts are not encoded; the mnist and cifar10 recipes
run 100 epochs unless told otherwise (`-- --epochs N` or `-- --steps N`).
XLA is `rnode train --jit auto`'s choice unless --jit or --no-jit says
otherwise: on a GPU on, on a CPU off (there XLA compiles these conv dynamics
into a step about 19x slower than graph mode).
"""

import shlex
import sys

import click

PAPER = ["--architecture", "multiscale", "--blocks", "2", "--layer-type", "concat",
         "--kinetic", "0.01", "--jacobian", "0.01", "--trace", "hutchinson",
         "--eval-method", "dopri5", "--eval-rtol", "1e-5", "--eval-atol", "1e-5",
         "--lr", "1e-3", "--logit-alpha", "1e-6"]

RECIPES = {
    "mnist": ["--dataset", "mnist", *PAPER, "--hidden", "64,64,64", "--method", "rk4",
              "--step-size", "0.25", "--batch-size", "200", "--warmup-steps", "1000",
              "--epochs", "100"],
    "cifar10": ["--dataset", "cifar10", *PAPER, "--hidden", "64,64,64", "--method",
                "dopri5", "--rtol", "1e-5", "--atol", "1e-5", "--batch-size", "200",
                "--warmup-steps", "1000", "--epochs", "100"],
    "digits": ["--dataset", "digits", *PAPER, "--hidden", "32,32,32", "--method", "rk4",
               "--step-size", "0.25", "--batch-size", "200", "--warmup-steps", "100",
               "--steps", "500"],
}


def recipe_args(name, out=None, devices=1, jit=None, extra=()):
    """The `rnode train` arguments of a recipe, with the caller's additions last."""
    args = list(RECIPES[name])
    extra = list(extra)
    # --steps and --epochs exclude each other: an override of one drops the recipe's other.
    for flag, other in (("--steps", "--epochs"), ("--epochs", "--steps")):
        if flag in extra and other in args:
            i = args.index(other)
            del args[i:i + 2]
    if out:
        args += ["--out", out]
    args += ["--devices", str(devices), "--jit", {None: "auto", True: "on", False: "off"}[jit]]
    return args + extra


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", type=click.Choice(sorted(RECIPES)))
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
@click.option("--out", default=None, help="Run directory.  [default: runs/DATASET]")
@click.option("--devices", default=1, show_default=True, type=click.IntRange(min=1),
              help="Data-parallel training on this many devices (MirroredStrategy).")
@click.option("--jit/--no-jit", default=None,
              help="XLA: faster on GPUs; on CPU about 19x slower with conv dynamics.  "
                   "[default: rnode train's --jit auto]")
@click.option("--dry-run", is_flag=True, help="Print the `rnode train` command and stop.")
def main(recipe, extra, out, devices, jit, dry_run):
    """Train RECIPE (digits, mnist, cifar10) with the paper's settings; EXTRA goes to rnode train."""
    args = recipe_args(recipe, out, devices, jit, extra)
    click.echo("rnode train " + shlex.join(args))
    if dry_run:
        return
    from keras_rnode.cli import main as rnode

    rnode.main(["train", *args], prog_name="rnode", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
