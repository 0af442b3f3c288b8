"""``sslprobe plot``: draw probe accuracy and losses from a Lightning CSV log (``metrics.csv``)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from sslprobe._imports import require

__all__ = ["plot_metrics", "read_metrics"]


def read_metrics(path: str | Path) -> dict[str, list[tuple[float, float, float]]]:
    r"""Read a Lightning ``CSVLogger`` file into ``{column: [(epoch, step, value), ...]}`` (empty cells skipped).

    Examples:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = f.write_text("epoch,step,eval/linear_top1\n0,9,0.5\n1,19,0.75\n")
        >>> read_metrics(f)["eval/linear_top1"]
        [(0.0, 9.0, 0.5), (1.0, 19.0, 0.75)]
    """
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"sslprobe plot: {path} is not a Lightning CSVLogger file (no 'step' column).")
        for row in reader:
            epoch = float(row["epoch"]) if row.get("epoch") not in (None, "") else math.nan
            step = float(row["step"]) if row.get("step") not in (None, "") else math.nan
            for key, cell in row.items():
                if key in ("epoch", "step") or cell in (None, ""):
                    continue
                try:
                    series[key].append((epoch, step, float(cell)))
                except ValueError:
                    continue
    return dict(series)


def plot_metrics(csv_path: str | Path, out_path: str | Path | None = None, title: str | None = None) -> Path:
    """Plot every metric of a Lightning CSV log: accuracies and other metrics per epoch, losses per step.

    Args:
        csv_path: a ``metrics.csv`` written by Lightning's ``CSVLogger``.
        out_path: the PNG to write; default ``probes.png`` beside the CSV.
        title: figure title; default the CSV's folder name.

    Returns:
        The path of the PNG.

    Raises:
        ModuleNotFoundError: when matplotlib is not installed (with the install line).
        ValueError: when the file is not a Lightning CSV log or holds no metric.
    """
    require("matplotlib", feature="sslprobe plot")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    out = Path(out_path) if out_path is not None else csv_path.with_name("probes.png")
    series = read_metrics(csv_path)
    losses = {k: v for k, v in series.items() if "loss" in k}
    others = {k: v for k, v in series.items() if "loss" not in k and not k.startswith(("lr-", "epoch"))}
    if not series:
        raise ValueError(f"sslprobe plot: {csv_path} holds no metric values.")
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, points in sorted(others.items()):
        by_epoch = sorted((e, v) for e, _, v in points if not math.isnan(e))
        if by_epoch:
            ax_metric.plot([e + 1 for e, _ in by_epoch], [v for _, v in by_epoch], marker="o", markersize=3, label=key)
    ax_metric.set(xlabel="epoch", ylabel="metric", title="probe metrics")
    for key, points in sorted(losses.items()):
        by_step = sorted((s, v) for _, s, v in points if not math.isnan(s))
        if by_step:
            ax_loss.plot([s for s, _ in by_step], [v for _, v in by_step], label=key, linewidth=1)
    ax_loss.set(xlabel="step", ylabel="loss", title="losses")
    for ax in (ax_metric, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or csv_path.parent.name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
