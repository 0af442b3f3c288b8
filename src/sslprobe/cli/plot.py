"""``sslprobe plot``: draw probe accuracy and losses from a Lightning CSV log (``metrics.csv``)."""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path

from sslprobe._imports import require

__all__ = ["find_metrics_csv", "plot_metrics", "read_metrics"]

_VERSION_DIR = re.compile(r"version_(\d+)")


def find_metrics_csv(path: str | Path) -> Path:
    r"""The ``metrics.csv`` that ``path`` names: the file itself, or the one in a run folder.

    A folder holds it directly (``sslprobe demo``'s run folder) or in Lightning's ``CSVLogger`` layout,
    ``version_N/metrics.csv``; of several versions, the newest (highest ``N``) is taken.

    Args:
        path: a ``metrics.csv`` (returned as it is) or a folder.

    Returns:
        The path of the CSV file.

    Raises:
        FileNotFoundError: when a folder holds no ``metrics.csv`` in either place.

    Examples:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> for n in (1, 2, 10):
        ...     (run / f"version_{n}").mkdir()
        ...     _ = (run / f"version_{n}" / "metrics.csv").write_text("epoch,step\n")
        >>> find_metrics_csv(run).relative_to(run).as_posix()
        'version_10/metrics.csv'
    """
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    versions = [
        (int(match.group(1)), csv_path)
        for csv_path in path.glob("version_*/metrics.csv")
        if (match := _VERSION_DIR.fullmatch(csv_path.parent.name)) and csv_path.is_file()
    ]
    if not versions:
        raise FileNotFoundError(
            f"sslprobe plot: no metrics.csv in the folder {path}, nor in a version_N/ folder inside it. Pass a "
            "metrics.csv written by Lightning's CSVLogger, or the run folder that holds it."
        )
    return max(versions)[1]


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
        csv_path: a ``metrics.csv`` written by Lightning's ``CSVLogger``, or a run folder holding one (see
            :func:`find_metrics_csv`).
        out_path: the PNG to write; default ``probes.png`` beside the CSV.
        title: figure title; default the CSV's folder name.

    Returns:
        The path of the PNG.

    Raises:
        ModuleNotFoundError: when matplotlib is not installed (with the install line).
        FileNotFoundError: when there is no such file, or the folder holds no ``metrics.csv``.
        ValueError: when the file is not a Lightning CSV log or holds no metric.
    """
    require("matplotlib", feature="sslprobe plot")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    csv_path = find_metrics_csv(csv_path)
    out = Path(out_path) if out_path is not None else csv_path.with_name("probes.png")
    series = read_metrics(csv_path)
    losses = {k: v for k, v in series.items() if "loss" in k}
    # Hyper-parameters a probe reports (a refit's lambda, a sweep's best lr/wd) are not scores on the 0-1 axis.
    settings = ("_lambda", "_best_lr", "_best_wd")
    others = {
        k: v
        for k, v in series.items()
        if "loss" not in k and not k.startswith(("lr-", "epoch")) and not k.endswith(settings)
    }
    if not series:
        raise ValueError(f"sslprobe plot: {csv_path} holds no metric values.")
    # Scores (accuracies) lie in [0, 1]; a metric outside it (an effective rank, a spectrum's exponent) gets its own
    # axis, so that the scores stay readable.
    scores = {k: v for k, v in others.items() if all(0.0 <= value <= 1.0 for _, _, value in v if not math.isnan(value))}
    health = {k: v for k, v in others.items() if k not in scores}
    panels = 3 if health else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    ax_metric, ax_loss = axes[0], axes[1]
    for ax, group, title_ in (
        (ax_metric, scores, "probe metrics"),
        *(((axes[2], health, "other metrics"),) if health else ()),
    ):
        for key, points in sorted(group.items()):
            by_epoch = sorted((e, v) for e, _, v in points if not math.isnan(e))
            if by_epoch:
                ax.plot([e + 1 for e, _ in by_epoch], [v for _, v in by_epoch], marker="o", markersize=3, label=key)
        ax.set(xlabel="epoch", ylabel="metric", title=title_)
    for key, points in sorted(losses.items()):
        by_step = sorted((s, v) for _, s, v in points if not math.isnan(s))
        if by_step:
            ax_loss.plot([s for s, _ in by_step], [v for _, v in by_step], label=key, linewidth=1)
    ax_loss.set(xlabel="step", ylabel="loss", title="losses")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or csv_path.parent.name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
