"""Bits/dim of a saved RNODE image model on a data set's test split.

    python scripts/evaluate_bpd.py runs/digits --dataset digits
    python scripts/evaluate_bpd.py runs/mnist/model.keras --dataset mnist --batch-size 200 --json

MODEL_PATH is a run directory (from `rnode train`) or a .keras file. The
figure is the uniformly dequantized bits/dim (what papers report), with the
midpoint ("clean") figure beside it, labelled; both with the model's
evaluation solver. The evaluation itself is `keras_rnode.evaluation.evaluate_model`,
the one `rnode evaluate` uses.
"""

import click

from keras_rnode.datasets.registry import IMAGE_DATASETS, load_data
from keras_rnode.evaluation import emit_result, evaluate_model
from keras_rnode.runs import load_model


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", type=click.Path())
@click.option("--dataset", required=True, type=click.Choice(IMAGE_DATASETS),
              help="Image data set whose test split is evaluated.")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--n", "n", default=None, type=click.IntRange(min=1),
              help="Evaluate only the first N test images.")
@click.option("--json", "json_only", is_flag=True, help="Print only the JSON line.")
def main(model_path, dataset, batch_size, n, json_only):
    """Evaluate bits/dim of MODEL_PATH (a run directory or .keras file) on DATASET's test split."""
    try:
        model = load_model(model_path)
        if not model.levels:
            raise ValueError(f"{model_path} models continuous data (no grey levels); "
                             "bits/dim needs an image model: use `rnode evaluate`")
        x, levels = load_data(dataset, "test", n)
        if levels != model.levels:
            raise ValueError(f"{dataset} has {levels} grey levels, the model was trained for "
                             f"{model.levels}")
        result = evaluate_model(model, x, batch_size)
    except (ValueError, OSError) as err:  # bad input: one line, no traceback
        raise click.ClickException(str(err)) from None
    emit_result(dataset, result, json_only, echo=click.echo)


if __name__ == "__main__":
    main()
