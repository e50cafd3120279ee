"""One figure of the RNODE-vs-unregularized curves of several data sets (README headline).

Reads the JSON lines that benchmarks/rnode_vs_ffjord.py writes (one file
per data set, possibly from separate runs) and draws, per data set, the
held-out objective and the forward NFE per training step against training
time, RNODE and unregularized together.

    python benchmarks/plot_curves.py benchmarks/results/long/*.jsonl \
        --out benchmarks/results/long/headline.png
"""

import json
from pathlib import Path

import click

COLORS = {"rnode": "tab:blue", "unregularized": "tab:orange"}


def read_run(path):
    """(config, records by model, summary or None) from one JSON-lines file."""
    config, summary, records = {}, None, {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "config" in row:
            config = row["config"]
        elif "summary" in row:
            summary = row["summary"]
        else:
            records.setdefault(row["model"], []).append(row)
    if not records:
        raise click.ClickException(f"{path}: no training records")
    return config, records, summary


def draw(runs, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(3.6 * len(runs), 6.2), squeeze=False)
    for col, (path, (config, records, summary)) in enumerate(runs.items()):
        dataset = next(iter(records.values()))[0]["dataset"]
        clock = config.get("clock", "wall")
        unit = "bits/dim" if dataset == "digits" else "nats"
        ax_nll, ax_nfe = axes[0, col], axes[1, col]
        for kind, rows in records.items():
            rows = rows[1:]  # the compile step, off the clock
            t = [r[f"{clock}_s"] / 60 for r in rows]
            ax_nll.plot(t, [r["nll"] for r in rows], color=COLORS.get(kind), lw=1.4, label=kind)
            ax_nfe.plot(t, [r["nfe_forward"] for r in rows], color=COLORS.get(kind), lw=1.4,
                        label=kind)
        values = [r["nll"] for rows in records.values() for r in rows[len(rows) // 4:]]
        spread = max(values) - min(values)
        ax_nll.set_ylim(min(values) - 0.1 * spread, max(values) + 0.4 * spread)
        if summary:
            ax_nll.axhline(summary["target"], color="grey", lw=0.8, ls=":")
        ax_nll.set_title(f"{dataset} (held-out, {unit})")
        ax_nll.set_ylabel("held-out NLL" if col == 0 else "")
        ax_nfe.set_ylabel("forward NFE per step" if col == 0 else "")
        ax_nfe.set_xlabel(f"training {'CPU' if clock == 'cpu' else 'wall'} time [min]")
        for ax in (ax_nll, ax_nfe):
            ax.grid(alpha=0.3)
        ax_nfe.set_ylim(bottom=0)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The PNG to write.")
def main(paths, out):
    """Draw the curves of the given rnode_vs_ffjord.py JSON-lines files side by side."""
    draw({p: read_run(p) for p in paths}, out)
    click.echo(f"written to {out}", err=True)


if __name__ == "__main__":
    main()
