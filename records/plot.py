#!/usr/bin/env python3
"""Plot validation loss curves from train_gpt.py run logs.

Two panels: val loss against train time (minutes) and against training tokens
(counted from each log's header: tokens_per_step and half_batch_steps). One curve per log, labelled
by file name; the target val loss is drawn as a dashed horizontal line.
--group_by KEY (a header key such as recipe) gives the logs that share its
value one colour and one legend entry, e.g. three seeds of each recipe.

Usage: python records/plot.py LOG [LOG ...] -o curves.png [--target X] [--group_by recipe] [--title TEXT]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify import parse_log, header_float, header_int  # noqa: E402
from train_gpt import OneLineParser, atomic_write, tokens_read  # noqa: E402  (verify puts the root on the path)
from bench.cli import run_tool  # noqa: E402


class PlotError(Exception):
    pass


def load_curve(path) -> dict:
    """Read one log and return its val curve. Raises PlotError with a one-line message."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise PlotError(f"{path}: no such file")
    except OSError as e:
        raise PlotError(f"{path}: cannot read ({e.strerror or e})")
    parsed = parse_log(text)
    val = parsed["val"]
    if not val:
        raise PlotError(f"{path}: no val lines (step:N/M val_loss:...) found")
    header = parsed["header"]
    tps = header.get("tokens_per_step")
    try:
        tokens_per_step = int(tps.split()[0]) if tps is not None else None
    except (ValueError, IndexError):
        raise PlotError(f"{path}: unparseable tokens_per_step header value {tps!r}")
    if tokens_per_step is None:
        raise PlotError(f"{path}: no 'tokens_per_step:' header line")
    half_batch_steps = header_int(header, "half_batch_steps") or 0  # logs from before the flag have none

    def finite(x):
        return x if math.isfinite(x) else float("nan")

    return {
        "path": path,
        "steps": [v["step"] for v in val],
        "minutes": [v["train_time_ms"] / 60000.0 for v in val],
        "tokens": [tokens_read(v["step"], tokens_per_step, half_batch_steps) for v in val],
        "val_loss": [finite(v["loss"]) for v in val],
        "target": header_float(header, "target_val_loss"),
        "header": header,
    }


def _labels(paths) -> list[str]:
    stems = [p.stem for p in paths]
    out = []
    for p, stem in zip(paths, stems):
        if stems.count(stem) > 1:
            out.append(f"{p.parent.name}/{p.stem}")
        else:
            out.append(stem)
    return out


def groups(curves: list[dict], key: str) -> list[tuple[str, list[dict]]]:
    """(value, curves) for each value of header `key`, in order of first appearance. Raises PlotError when a log
    lacks the key."""
    out: dict[str, list[dict]] = {}
    for curve in curves:
        value = curve["header"].get(key)
        if value is None:
            raise PlotError(f"{curve['path']}: no '{key}:' header line to group by")
        out.setdefault(value, []).append(curve)
    return list(out.items())


def plot_curves(curves: list[dict], out_path, target: float | None = None, group_by: str | None = None,
                title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_n) = plt.subplots(1, 2, figsize=(13, 5))
    if group_by:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

        def legend(value, n):
            return f"{group_by} {value} ({n} run{'s' * (n != 1)})"

        styled = [(curve, dict(color=colours[i % len(colours)], label=legend(value, len(members)) if j == 0 else None))
                  for i, (value, members) in enumerate(groups(curves, group_by)) for j, curve in enumerate(members)]
    else:
        styled = [(curve, dict(label=label)) for curve, label in zip(curves, _labels([c["path"] for c in curves]))]
    for curve, style in styled:
        ax_t.plot(curve["minutes"], curve["val_loss"], marker=".", **style)
        ax_n.plot(curve["tokens"], curve["val_loss"], marker=".", **style)
    if target is not None:
        targets = [target]
    else:
        targets = sorted({c["target"] for c in curves if c["target"] is not None})
    for ax in (ax_t, ax_n):
        for t in targets:
            ax.axhline(t, linestyle="--", color="gray", linewidth=1, label=f"target {t:g}")
        ax.set_ylabel("val loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax_t.set_xlabel("train time (minutes)")
    ax_t.set_title("val loss vs train time")
    ax_n.set_xlabel("training tokens")
    ax_n.set_title("val loss vs tokens")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    try:  # the format named, since the temporary file's name does not end in it
        atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(out_path).suffix[1:].lower()))
    finally:
        plt.close(fig)


FORMATS = (".png", ".pdf", ".svg")


def output_problem(out_path: str) -> str | None:
    """Why the figure cannot be written at out_path (one line), or None."""
    path = Path(out_path)
    try:
        is_dir = path.is_dir()
    except OSError as e:  # e.g. a name too long for the file system
        return f"-o {out_path}: {e.strerror or e}; give a shorter file name"
    if is_dir:
        return f"-o {out_path} is a folder: give a file name, e.g. {path / 'curves.png'}"
    if path.suffix.lower() not in FORMATS:
        return f"-o {out_path}: give a file ending in {', '.join(FORMATS)}"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"-o {out_path}: {parent} is a file, not a folder"
    return None


def main(argv=None) -> int:
    ap = OneLineParser(
        description="Plot val loss against train time and against tokens for one or more run logs.")
    ap.add_argument("logs", nargs="+", metavar="LOG", help="run log(s), e.g. logs/<run_id>.txt")
    ap.add_argument("-o", "--output", default="curves.png", help="output PNG path (default: curves.png)")
    ap.add_argument("--target", type=float, default=None,
                    help="target val loss line (default: target_val_loss from the log headers)")
    ap.add_argument("--group_by", default=None, metavar="KEY",
                    help="one colour and legend entry per value of this log header key (e.g. recipe)")
    ap.add_argument("--title", default=None, help="figure title")
    args = ap.parse_args(argv)
    problem = output_problem(args.output)
    if args.target is not None and not math.isfinite(args.target):
        problem = f"--target {args.target}: give a finite val loss"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        curves = [load_curve(p) for p in args.logs]
        if args.group_by:
            groups(curves, args.group_by)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        plot_curves(curves, args.output, target=args.target, group_by=args.group_by, title=args.title)
    except OSError as e:
        print(f"error: -o {args.output}: cannot write it ({e.strerror or e}); give a file in a folder you can write",
              file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    run_tool(main)
