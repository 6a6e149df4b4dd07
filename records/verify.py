#!/usr/bin/env python3
"""Verify run logs written by train_gpt.py, test a record's statistics, and re-run a log's first steps.

    python records/verify.py LOG [LOG ...]                 # structure, metrics.jsonl, t-test of the mean val loss
    python records/verify.py --reproduce 200 LOG [LOG ...]  # also re-run each log's first 200 steps and compare

--reproduce runs a log's embedded source, in a child process, only when git vouches for it (train_gpt.py at a
commit of HEAD's history, or the source of a log under records/ as committed in HEAD); another is refused with a
diff summary unless --run-unknown-code is given. It also sets the reproduced train time against the logged one and,
on the same hardware, flags a logged time far below it.

Two logs with the same losses (see fingerprint) are one run under two names: the later one fails, as does a log
with the losses of a log under records/ at another path.

A log is accepted when its embedded source hashes to its `code_sha256:` line, every step line parses, train_time
never decreases, the train and val lines sit exactly on the log_interval / eval_interval grid up to where the run
stopped, the outcome line agrees with the val lines (a val line with screen_tokens scored only the screen, so
it is never the best), and (where logs/<run_id>/metrics.jsonl is given or found
beside the log) every printed loss and train_time is its full-precision value rounded to the printed digits.

The statistics follow records/README.md: a record runs its whole max_iters budget and its mean final val loss must
be below the target at p < 0.01 (one-sided one-sample t-test). Logs that stopped at the target get their time to
target reported, but no t-test: their final val losses sit at the target by construction.

Exit codes: 0 all verified (and p < 0.01 unless --no-stats); 1 a log, the statistics or a reproduction failed;
2 bad input (a missing log, missing data for --reproduce, bad flags).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import glob
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import train_gpt  # noqa: E402  (the log format: LOG_PATTERNS, LOG_SEPARATOR)

LOG = train_gpt.LOG_PATTERNS
P_MAX = 0.01  # a record's mean final val loss must be below the target at this one-sided p-value
_FLOAT_RE = re.compile(r"^(?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity))$", re.I)

# the groups of LOG's event lines, by pattern name; names ending in path or _str stay strings
EVENT_FIELDS = {
    "resume": ("path", "step", "train_time_ms"),
    "checkpoint": ("step", "saved_time_ms", "path"),
    "data_pass": ("pass", "step"),
    "reached": ("target_str", "step", "train_time_ms"),
    "not_reached": ("target_str", "best_val_loss_str", "step"),
}
# header keys whose value must not change if they are printed more than once
_CRITICAL_KEYS = ("target_val_loss", "val_tokens", "tokens_per_step")
# header keys the step-line checks need
_GRID_KEYS = ("max_iters", "eval_interval", "log_interval")


def _parse_float(s: str) -> float:
    if not _FLOAT_RE.match(s):  # float() also takes '1_0' and ' 1'
        raise ValueError(f"not a number: {s!r}")
    return float(s)


def _decimals(s: str) -> int:
    return len(s.partition(".")[2])


def _prints_as(full: float, printed: str) -> bool:
    """Whether the full-precision value, formatted with the printed string's decimals, is the printed string."""
    if math.isnan(full) or math.isnan(_parse_float(printed)):
        return math.isnan(full) and math.isnan(_parse_float(printed))
    return f"{full:.{_decimals(printed)}f}" == printed


def _fmt_like(full, printed: str) -> str:
    try:
        return f"{float(full):.{_decimals(printed)}f}"
    except (TypeError, ValueError):
        return "nothing"


def _printed_range(printed: str) -> tuple[float, float]:
    """The values that print as `printed`, whatever digits were rounded away."""
    value, half = _parse_float(printed), 0.5 * 10 ** -_decimals(printed)
    return value - half, value + half


def header_float(header: dict, key: str):
    try:
        return _parse_float(header[key].split()[0])
    except (KeyError, ValueError, IndexError):
        return None


def header_int(header: dict, key: str):
    value = header_float(header, key)
    return int(value) if value is not None and math.isfinite(value) and value == int(value) else None


def log_cpu(parsed: dict):
    """(model, logical cores, torch threads) from the log's cpu: line, or None."""
    m = LOG["cpu"].match(f"cpu: {parsed['header'].get('cpu', '')}")
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


# ---------------------------------------------------------------- parsing

def parse_step_line(line: str) -> dict:
    """One `step:` line. Raises ValueError saying what is malformed."""
    m = LOG["step"].match(line)
    if not m:
        raise ValueError("not step:N/M train_loss|val_loss:X train_time:Nms step_avg:Xms [key:value ...]")
    step, total, kind, loss, train_time, step_avg, rest = m.groups()
    extra = dict(token.split(":", 1) for token in rest.split())
    if len(extra) < len(rest.split()) or extra.keys() & {"train_loss", "val_loss", "train_time", "step_avg"}:
        raise ValueError("a field is repeated")
    if int(step) > int(total):
        raise ValueError(f"step {step} exceeds total {total}")
    _parse_float(step_avg)
    return {"kind": kind, "step": int(step), "total": int(total), "loss": _parse_float(loss), "loss_str": loss,
            "train_time_ms": int(train_time), "train_time_str": train_time, "step_avg_str": step_avg, "extra": extra}


def parse_log(text: str) -> dict:
    """The parts of a run log; never raises: problems go to `errors`, one line each. `header` holds the first value
    of each `key: value` line between the code_sha256 line and the first step line, `events` the step, resume,
    checkpoint, data-pass and outcome lines in order, `final` the outcome line."""
    out: dict = {
        "source": None, "code_sha256": None, "computed_sha256": None,
        "header": {}, "header_all": {}, "header_order": [], "header_conflicts": {}, "versions": None,
        "events": [], "val": [], "train": [], "final": None, "final_lines": 0, "last_line": None, "errors": [],
    }
    lines = text.split("\n")
    in_header = True
    for lineno0 in range(_read_source(lines, out), len(lines)):
        line = lines[lineno0].rstrip("\r")
        if line.strip():
            out["last_line"] = (lineno0 + 1, line)
        in_header = in_header and not line.startswith("step:")
        if not _read_event(line, lineno0 + 1, out) and in_header:
            _read_header_line(line, out)
    return out


def _read_source(lines: list[str], out: dict) -> int:
    """Fills in the embedded source, its sha256 and the logged one; returns the index of the first header line."""
    if train_gpt.LOG_SEPARATOR not in lines:
        out["errors"].append("no separator line of 100 '=' found")
        return 0
    sep = lines.index(train_gpt.LOG_SEPARATOR)
    out["source"] = "".join(line + "\n" for line in lines[:sep])
    out["computed_sha256"] = hashlib.sha256(out["source"].encode("utf-8")).hexdigest()
    m = LOG["code_sha256"].match(lines[sep + 1] if sep + 1 < len(lines) else "")
    if not m:
        out["errors"].append("line after the separator is not 'code_sha256:<64 hex>'")
        return sep + 1
    out["code_sha256"] = m.group(1)
    return sep + 2


def _read_event(line: str, lineno: int, out: dict) -> bool:
    """Records a step, resume, checkpoint, data-pass or outcome line (or its error); False for any other line."""
    if line.startswith("step:"):
        try:
            rec = {**parse_step_line(line), "type": "step", "lineno": lineno}
        except ValueError as e:
            out["errors"].append(f"line {lineno}: unparseable step line ({e}): {line[:120]!r}")
            return True
        out[rec["kind"]].append(rec)
        out["events"].append(rec)
        return True
    is_outcome = line.startswith("target val_loss ")
    out["final_lines"] += int(is_outcome)
    for name, fields in EVENT_FIELDS.items():
        m = LOG[name].match(line)
        if m:
            rec = {key: value if key.endswith(("path", "_str")) else int(value)
                   for key, value in zip(fields, m.groups())}
            rec.update(type=name, lineno=lineno)
            if is_outcome:
                rec.update(type="final", reached=name == "reached")
                out["final"] = rec
            out["events"].append(rec)
            return True
    if is_outcome:
        out["errors"].append(f"line {lineno}: malformed target line: {line[:120]!r}")
    return is_outcome


def _read_header_line(line: str, out: dict) -> None:
    m = LOG["versions"].match(line)
    if m and out["versions"] is None:
        out["versions"] = {"python": m.group(1), "torch": m.group(2)}
        return
    m = LOG["header"].match(line)
    if m:
        key, value, header = m.group(1), m.group(2) or "", out["header"]
        out["header_order"].append((key, value))
        out["header_all"].setdefault(key, []).append(value)
        if key not in header:
            header[key] = value
        elif key in _CRITICAL_KEYS and header[key] != value:
            out["header_conflicts"].setdefault(key, [header[key]]).append(value)


# ---------------------------------------------------------------- checks

def effective_steps(parsed: dict) -> list[dict]:
    """The step lines that make up the finished run, in log order. A resume at step R continues from a checkpoint
    written after train step R and before the val line for step R, so the lines the interrupted process printed
    after that checkpoint (train steps > R, val steps >= R) are dropped: the resumed process prints them again."""
    kept: list[dict] = []
    for ev in parsed["events"]:
        if ev["type"] == "resume":
            r = ev["step"]
            kept = [e for e in kept if (e["step"] <= r if e["kind"] == "train" else e["step"] < r)]
        elif ev["type"] == "step":
            kept.append(ev)
    return kept


def _check_source(parsed: dict) -> str | None:
    if parsed["source"] is None:
        return "no separator line of 100 '=' after the embedded source"
    if parsed["code_sha256"] is None:
        return "missing or malformed code_sha256 line after the separator"
    if parsed["computed_sha256"] != parsed["code_sha256"]:
        return (f"code sha256 mismatch: embedded source hashes to {parsed['computed_sha256'][:16]}..., "
                f"log claims {parsed['code_sha256'][:16]}...")
    if parsed["errors"]:
        return parsed["errors"][0]
    if parsed["header_conflicts"]:
        key, values = next(iter(parsed["header_conflicts"].items()))
        return f"header key {key} printed with conflicting values {values}"
    return None


def _check_order(parsed: dict) -> str | None:
    """train_time never decreases and the step never goes back, except to a checkpoint this log saved, by a resume
    (the work the interrupted process did after that checkpoint is discarded)."""
    last_time, last_step = (-1, None), (-1, None)  # (value, line number)
    saved = set()
    for ev in parsed["events"]:
        t, lineno = ev.get("train_time_ms"), ev["lineno"]
        if ev["type"] == "checkpoint":
            saved.add((ev["step"], ev["saved_time_ms"], ev["path"]))
        elif ev["type"] == "resume":
            if (ev["step"], t, ev["path"]) not in saved:
                return f"line {lineno}: resume from a checkpoint (step {ev['step']}, {t}ms) that this log never saved"
            last_time, last_step = (t, lineno), (ev["step"], lineno)
            continue
        if t is not None:
            if t < last_time[0]:
                return f"line {lineno}: train_time {t}ms decreases (was {last_time[0]}ms at line {last_time[1]})"
            last_time = (t, lineno)
        if ev["type"] == "step":
            if ev["step"] < last_step[0]:
                return f"line {lineno}: step {ev['step']} goes back (was {last_step[0]} at line {last_step[1]})"
            last_step = (ev["step"], lineno)
    return None


def _check_step_avg(eff: list[dict]) -> str | None:
    """Each line's step_avg is its train_time over its step, to the printed digits: an edited train_time (or
    step_avg) shows even in a log without its metrics.jsonl."""
    for e in eff:
        if e["step"] == 0:
            continue
        # train_time is printed to the millisecond, step_avg to 0.01 ms
        slack = 0.5 / e["step"] + 0.005 + 1e-9
        if abs(_parse_float(e["step_avg_str"]) - e["train_time_ms"] / e["step"]) > slack:
            return (f"line {e['lineno']}: step_avg {e['step_avg_str']}ms is not train_time {e['train_time_ms']}ms "
                    f"over step {e['step']}")
    return None


def _check_final_and_header(parsed: dict, grid: dict, vals: list[dict]) -> str | None:
    """One outcome line, last; the header's target agrees with it; the grid's keys are there."""
    final, count, header = parsed["final"], parsed["final_lines"], parsed["header"]
    if final is None:
        return "no final 'target val_loss ...' line (incomplete run?)"
    if count != 1:
        return f"{count} 'target val_loss' lines, expected exactly 1"
    if parsed["last_line"][0] != final["lineno"]:
        return f"line {parsed['last_line'][0]}: output after the final 'target val_loss' line"
    target = header_float(header, "target_val_loss")
    if target is None:
        return "no 'target_val_loss:' header line (or an unparseable one): the outcome line cannot be checked"
    try:
        printed = _parse_float(final["target_str"])
    except ValueError:
        return f"unparseable target in final line: {final['target_str']!r}"
    decimals = _decimals(final["target_str"])
    if round(target, decimals) != round(printed, decimals):
        return (f"line {final['lineno']}: final line target {final['target_str']} disagrees with header "
                f"target_val_loss {header['target_val_loss']}")
    for key in _GRID_KEYS:
        if grid[key] is None:
            return f"no '{key}:' header line (or not an integer): the step lines cannot be checked"
    if grid["log_interval"] <= 0 or grid["max_iters"] <= 0 or grid["eval_interval"] < 0:
        return f"header intervals out of range: {grid}"
    return None if vals else "no val lines"


def _grid(upto: int, max_iters: int, eval_interval: int, log_interval: int):
    """(step, kind) of every line a run that reached step `upto` prints, in the order it prints them."""
    for s in range(upto + 1):
        if s > 0 and (s % log_interval == 0 or s == max_iters):
            yield s, "train"
        if (eval_interval > 0 and s % eval_interval == 0) or s == max_iters:
            yield s, "val"


def _check_grid(parsed: dict, eff: list[dict], grid: dict, target: float) -> str | None:
    """Every train line at each log_interval step, every val line at each eval_interval step and at max_iters,
    in order, nothing else, and no val line below the target before the last one."""
    max_iters, eval_interval, log_interval = grid["max_iters"], grid["eval_interval"], grid["log_interval"]
    for e in eff:
        if e["total"] != max_iters:
            return f"line {e['lineno']}: step:{e['step']}/{e['total']} but the header's max_iters is {max_iters}"
    every = {"train": f"log_interval {log_interval}", "val": f"eval_interval {eval_interval}"}

    def missing(lineno, want):
        return (f"line {lineno}: the {want[1]} line for step:{want[0]} is missing before this line "
                f"({want[1]} lines come every {every[want[1]]} steps and at max_iters {max_iters})")

    expected = _grid(max(e["step"] for e in eff), max_iters, eval_interval, log_interval)
    for have, want in itertools.zip_longest(eff, expected):
        if want is None:
            return f"line {have['lineno']}: unexpected {have['kind']} line for step:{have['step']}"
        if have is None:  # name the line after the last step line: the missing one belongs before it
            later = [ev["lineno"] for ev in parsed["events"] if ev["lineno"] > eff[-1]["lineno"]]
            return missing(min(later, default=parsed["last_line"][0]), want)
        if (have["step"], have["kind"]) == want:
            continue
        order = {"train": 0, "val": 1}
        if (have["step"], order[have["kind"]]) > (want[0], order[want[1]]):
            return missing(have["lineno"], want)
        return (f"line {have['lineno']}: {have['kind']} line for step:{have['step']} is off the grid or repeated "
                f"(expected the {want[1]} line for step:{want[0]}; {every[have['kind']]})")
    for e in [e for e in eff if e["kind"] == "val"][:-1]:
        if target > 0 and _printed_range(e["loss_str"])[1] < target:
            return (f"line {e['lineno']}: val_loss {e['loss_str']} at step:{e['step']} is below the target "
                    f"{target:g}, so the run stops here, yet the log goes on")
    return None


def _check_metrics(eff: list[dict], rows: list[dict], name: str, target: float) -> str | None:
    """Each step line against the last metrics row for the same step and kind (a resumed run appends the rows of
    the steps it repeats, so the last row is the one the finished run printed)."""
    latest = {(kind, row["step"]): row for row in rows for kind in ("train", "val")
              if f"{kind}_loss" in row and isinstance(row.get("step"), int)}
    last_val = [e for e in eff if e["kind"] == "val"][-1]
    for e in eff:
        kind, step = e["kind"], e["step"]
        row = latest.get((kind, step))
        if row is None:
            return f"line {e['lineno']}: {kind} line for step:{step} has no row in {name}"
        full = row.get(f"{kind}_loss")
        if not isinstance(full, (int, float)) or not _prints_as(float(full), e["loss_str"]):
            return (f"line {e['lineno']}: {kind}_loss:{e['loss_str']} at step:{step}, but {name} has {full!r}, "
                    f"which prints as {_fmt_like(full, e['loss_str'])}")
        t = row.get("train_time_ms")
        if isinstance(t, (int, float)) and not _prints_as(float(t), e["train_time_str"]):
            return (f"line {e['lineno']}: train_time:{e['train_time_str']}ms at step:{step}, but {name} has "
                    f"{t!r}, which prints as {_fmt_like(t, e['train_time_str'])}ms")
        if kind == "val" and target > 0 and e is not last_val and float(full) <= target:
            return (f"line {e['lineno']}: val_loss {full!r} at step:{step} ({name}) is at or below the target "
                    f"{target:g}, so the run stops here, yet the log goes on")
    return None


def _check_outcome(parsed: dict, vals: list[dict], grid: dict, target: float) -> str | None:
    final, last_val = parsed["final"], vals[-1]
    if final["reached"]:
        if last_val["step"] != final["step"]:
            return (f"line {final['lineno']}: the outcome line names step:{final['step']} but the last val line "
                    f"(line {last_val['lineno']}) is at step:{last_val['step']}")
        if last_val["train_time_ms"] != final["train_time_ms"]:
            return (f"line {final['lineno']}: the outcome line's train_time {final['train_time_ms']}ms differs "
                    f"from the last val line's {last_val['train_time_ms']}ms (line {last_val['lineno']})")
        if target <= 0 or _printed_range(last_val["loss_str"])[0] > target:
            return (f"line {last_val['lineno']}: val_loss {last_val['loss_str']} at step:{last_val['step']} is "
                    f"not <= target {target:g}, yet the outcome line (line {final['lineno']}) says reached")
        return None
    if last_val["step"] != grid["max_iters"]:
        return (f"line {final['lineno']}: target not reached, yet the run stopped at step:{last_val['step']}, "
                f"before max_iters {grid['max_iters']} (an incomplete run)")
    best = final["best_val_loss_str"]
    try:
        best_value = _parse_float(best)
    except ValueError:
        return f"line {final['lineno']}: unparseable best val_loss {best!r}"
    full = [e for e in vals if "screen_tokens" not in e["extra"]]  # a screen's loss is no candidate for the best
    for e in full:
        if e["loss"] < best_value:
            return (f"line {e['lineno']}: val_loss {e['loss_str']} at step:{e['step']} is below the best val_loss "
                    f"{best} that the outcome line (line {final['lineno']}) reports")
    if not any(e["loss"] == best_value and e["step"] == final["step"] for e in full):
        return (f"line {final['lineno']}: the outcome line's best val_loss {best} at step:{final['step']} is not "
                "what any val line printed")
    return None


def read_metrics(log_path: Path, parsed: dict, metrics_dir=None) -> tuple[list[dict], str] | None:
    """The rows and path of the log's metrics.jsonl: <stem>/metrics.jsonl beside the log, or <stem or run_id>/
    metrics.jsonl under metrics_dir; None where there is none beside the log. Raises ValueError with the reason."""
    base = Path(metrics_dir) if metrics_dir is not None else log_path.parent
    names = [log_path.stem] + ([parsed["header"].get("run_id") or log_path.stem] if metrics_dir is not None else [])
    path = next((base / name / "metrics.jsonl" for name in names if (base / name / "metrics.jsonl").is_file()), None)
    if path is None:
        if metrics_dir is None:
            return None
        raise ValueError(f"no <run_id>/metrics.jsonl for this log under {metrics_dir} "
                         f"(looked for {log_path.stem}/metrics.jsonl)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {n}: not JSON") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows, str(path)


def _facts(parsed: dict, vals: list[dict], grid: dict, target: float | None) -> dict:
    """What verify_log reports of a log, as far as it could be read."""
    header = parsed["header"]
    facts = {"val_tokens": header.get("val_tokens"), "header_target": header_float(header, "target_val_loss"),
             "max_iters": grid["max_iters"], "code_sha256": parsed["code_sha256"],
             "n_resumes": sum(ev["type"] == "resume" for ev in parsed["events"]),
             "data_passes": [(ev["pass"], ev["step"]) for ev in parsed["events"] if ev["type"] == "data_pass"]}
    facts["target"] = target if target is not None else facts["header_target"]
    if vals:
        last = vals[-1]
        facts.update(final_val_loss=last["loss"], step=last["step"], train_time_ms=last["train_time_ms"])
        if grid["max_iters"] is not None:
            facts["budget"] = "fixed" if last["step"] == grid["max_iters"] else "stop"
    return facts


def verify_log(path, target: float | None = None, metrics_dir=None, text: str | None = None) -> dict:
    """Verify one log file; never raises for bad input (see `ok` and `reason`). target: the t-test's (default: the
    log's target_val_loss); metrics_dir: where <run_id>/metrics.jsonl lives (default: beside the log, if there).
    budget is "fixed" for a run to max_iters, "stop" for one that stopped at the target."""
    path = Path(path)
    result = {
        "path": str(path), "ok": False, "reason": None, "final_val_loss": None, "train_time_ms": None,
        "step": None, "max_iters": None, "budget": None, "target": target, "header_target": None,
        "val_tokens": None, "code_sha256": None, "n_resumes": 0, "metrics": None, "data_passes": [],
        "parsed": None,
    }
    try:
        text = path.read_bytes().decode("utf-8") if text is None else text
    except OSError as e:
        return dict(result, reason=f"cannot read file ({e.strerror or e})")
    except UnicodeDecodeError as e:
        return dict(result, reason=f"not valid UTF-8 ({e.reason} at byte {e.start})")
    parsed = result["parsed"] = parse_log(text)
    try:
        metrics = read_metrics(path, parsed, metrics_dir)
    except ValueError as e:
        return dict(result, reason=str(e))
    result["metrics"] = metrics[1] if metrics else None
    eff = effective_steps(parsed)
    vals = [e for e in eff if e["kind"] == "val"]
    grid = {key: header_int(parsed["header"], key) for key in _GRID_KEYS}
    result.update(_facts(parsed, vals, grid, target))
    # the first failing check is the reason; each check relies on what the ones before it passed
    header_target = result["header_target"]
    result["reason"] = (_check_source(parsed) or _check_order(parsed)
                        or _check_final_and_header(parsed, grid, vals)
                        or _check_grid(parsed, eff, grid, header_target) or _check_step_avg(eff)
                        or (metrics and _check_metrics(eff, *metrics, header_target))
                        or _check_outcome(parsed, vals, grid, header_target))
    result["ok"] = result["reason"] is None
    return result


# ---------------------------------------------------------------- statistics

def summarize(results: list[dict], target: float | None = None) -> dict:
    """Statistics over verified results. p is None when the t-test is not run, with the reason in `p_reason`.
    The t-test needs every verified run to have run its whole max_iters budget (budget == "fixed")."""
    ok = [r for r in results if r["ok"]]
    n = len(ok)
    out = {"n": n, "n_total": len(results), "target": target, "n_stop": 0,
           "loss_mean": None, "loss_std": None, "time_mean_s": None, "time_std_s": None,
           "p": None, "t": None, "p_reason": None}
    if n == 0:
        return dict(out, p_reason="no verified logs")
    import numpy as np
    from scipy import stats

    losses = np.array([r["final_val_loss"] for r in ok], dtype=float)
    times = np.array([r["train_time_ms"] / 1000.0 for r in ok], dtype=float)
    out["loss_mean"], out["time_mean_s"] = float(losses.mean()), float(times.mean())
    if n > 1:
        out["loss_std"], out["time_std_s"] = float(losses.std(ddof=1)), float(times.std(ddof=1))
    stop = [r for r in ok if r["budget"] != "fixed"]
    out["n_stop"] = len(stop)
    targets = {r["header_target"] for r in ok}
    if target is None and len(targets) != 1:
        return dict(out, p_reason=f"logs have different targets {sorted(targets)}; pass --target")
    target = out["target"] = target if target is not None else targets.pop()
    if stop:
        return dict(out, p_reason=f"{len(stop)} of {n} runs stopped at the target before max_iters, e.g. at "
                    f"step:{stop[0]['step']} of {stop[0]['max_iters']}, so their final val losses sit at or just below "
                    "it by construction; a record runs its whole max_iters budget, see records/README.md")
    if not target or target <= 0:
        return dict(out, p_reason="the logs' target_val_loss is 0 (no target); pass --target X")
    if n < 2:
        return dict(out, p_reason="n=1, need at least 2 runs")
    if losses.max() == losses.min():
        return dict(out, p_reason="zero variance in val losses")
    res = stats.ttest_1samp(losses, target, alternative="less")
    if math.isnan(res.pvalue):
        return dict(out, p_reason="t-test returned nan")
    return dict(out, p=float(res.pvalue), t=float(res.statistic))


def _fmt_time(ms) -> str:
    return "n/a" if ms is None else f"{ms / 1000:.2f}s ({ms / 60000:.2f} min)"


# ---------------------------------------------------------------- reproduction

# How to make the data a log names, by the folder its shards are in.
DATA_HINTS = {
    "tinyshakespeare_char": "python data/shakespeare.py --source tinyshakespeare --out_dir data/tinyshakespeare_char"
                            " (add --input FILE to use a local copy of tinyshakespeare.txt)",
    "shakespeare_char": "python data/shakespeare.py",
    "shakespeare_gpt2": "python data/shakespeare.py --mode gpt2",
    "fineweb10B": "python data/cached_fineweb10B.py",
}
# Header keys that are not part of the run's recipe: where it logged, whether it resumed or reported to wandb (and
# the device, which reproduce_argv passes on its own).
REPRODUCE_DROP = ("run_id", "log_dir", "resume", "wandb", "wandb_project", "wandb_run_name", "save_every", "device")
# Largest difference allowed between a logged and a reproduced loss at step s when the reproducing machine is not
# the one that wrote the log: min(TOLERANCE_BASE + TOLERANCE_PER_STEP * s, TOLERANCE_MAX) (records/README.md gives
# the measurements behind these figures).
TOLERANCE_BASE = 0.001
TOLERANCE_PER_STEP = 0.00015
TOLERANCE_MAX = 0.05
# How far below its reproduction on the same hardware a logged train time may be: the 7 runs of one record on one
# 2-core CPU are up to 32% apart (records/shakespeare_char/2026-11-29_SpeedrunNgram, 40 steps: 8.65 s to 12.68 s).
TIME_NOISE = 0.35
# The train time is judged only where the reproduction ran at least this long by the last compared step: below it,
# the first steps' start-up and the millisecond clock weigh too much.
TIME_MIN_MS = 1000


class ReproduceError(Exception):
    """Bad input for --reproduce (missing data, a configuration the log's own source refuses): exit code 2."""


class _Stop(Exception):
    """Raised inside the trainer once every step up to the requested one has been reproduced."""


class _RunFailed(Exception):
    """The reproduction itself stopped with an error (one line): exit code 1."""


def find_data(pattern: str) -> str | None:
    """The log's shard glob if it matches here, else the same path under this checkout or the current folder
    (a log written in another checkout names its absolute path), else None."""
    if glob.glob(pattern):
        return pattern
    parts = Path(pattern).parts
    for i in range(1, len(parts) - 1):
        for base in (Path.cwd(), ROOT):
            candidate = str(base.joinpath(*parts[i:]))
            if glob.glob(candidate):
                return candidate
    return None


def data_hint(pattern: str) -> str | None:
    """The command that makes the data in the shard glob's folder, where it is one of data/'s known folders."""
    return next((command for folder, command in DATA_HINTS.items() if folder in Path(pattern).parts), None)


def _log_data(path, parsed: dict) -> dict:
    """{input_bin, input_val_bin: the shard globs as found here}. Raises ReproduceError naming the missing data."""
    data = {}
    for key in ("input_bin", "input_val_bin"):
        pattern = parsed["header"].get(key)
        if not pattern:
            raise ReproduceError(f"{path}: no '{key}:' header line, so the data cannot be found")
        data[key] = find_data(pattern)
        if data[key] is None:
            hint = data_hint(pattern) or "a script in data/ (python data/shakespeare.py --help lists its options)"
            raise ReproduceError(f"{path}: the log's {key} {pattern} matches no file here; make the data with {hint}")
    return data


def same_machine(parsed: dict, device: str) -> tuple[bool, str]:
    """Whether this machine is the one that wrote the log: a CPU run, the same CPU model and core count, the same
    python and torch. Returns (same, why not)."""
    cpu = log_cpu(parsed)
    if device != "cpu" or cpu is None:
        return False, "not a CPU run on both sides"
    model, cores = train_gpt.cpu_model(), os.cpu_count() or 0  # cpu_model() wrote the log's cpu line
    if cpu[:2] != (model, cores):
        return False, f"the log's CPU is '{cpu[0]}' ({cpu[1]} cores), this one '{model}' ({cores} cores)"
    versions = parsed["versions"] or {}
    for key, value in {"python": platform.python_version(), "torch": torch.__version__}.items():
        if versions.get(key) != value:
            return False, f"the log has {key} {versions.get(key)}, this machine {value}"
    return True, ""


def reproduce_argv(parsed: dict, flags: set, log_dir: str, device: str | None, data: dict) -> tuple[list, str]:
    """--key=value for the header's configuration keys that are flags of the log's own parser (the data as found
    here), then the device (default: the log's), a log_dir, and no run_id or checkpoints of the log's own."""
    argv, seen = [], set()
    for key, value in parsed["header_order"]:
        if key in flags and key not in seen and key not in REPRODUCE_DROP and value != "None":
            seen.add(key)
            argv.append(f"--{key}={data.get(key, value)}")
    if device is None:
        logged = [v for v in parsed["header_all"].get("device", []) if v]
        device = logged[0].split(":")[0] if logged else "cpu"
    argv += [f"--device={device}", f"--log_dir={log_dir}"]
    argv += [f"--{key}={value}" for key, value in (("run_id", "reproduce"), ("save_every", "0")) if key in flags]
    return argv, device


def _git(root: Path, *args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["git", *args], cwd=root, input=stdin, capture_output=True, timeout=60, check=True).stdout


def _is_clone(root: Path) -> bool:
    """Whether root is the top folder of a git clone (not a folder inside another repository)."""
    try:
        top = _git(root, "rev-parse", "--show-toplevel").decode("utf-8", "replace").strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return Path(top).resolve() == Path(root).resolve()


def _git_blobs(root: Path, names: list[str]) -> list[bytes | None]:
    """The content of each object name (a blob's hash, or <commit>:<path>), None where it is no blob, from one
    `git cat-file --batch`."""
    batch = _git(root, "cat-file", "--batch", stdin="".join(f"{name}\n" for name in names).encode())
    blobs, at = [], 0
    for _ in names:  # each answer: "<hash> <type> <size>\n<size bytes>\n", or "<name> missing\n"
        header_end = batch.index(b"\n", at)
        header = batch[at:header_end].split()
        at = header_end + 1
        if len(header) != 3 or not header[2].isdigit():
            blobs.append(None)
            continue
        size = int(header[2])
        blobs.append(batch[at:at + size] if header[1] == b"blob" else None)
        at += size + 1
    return blobs


def _git_versions(root: Path) -> dict[str, str]:
    """{text: 'train_gpt.py at commit <short hash>'} for each commit of HEAD's history that changed train_gpt.py;
    {} without git or outside a clone."""
    if not _is_clone(root):
        return {}
    try:
        commits = _git(root, "rev-list", "HEAD", "--", "train_gpt.py").decode().split()
        blobs = _git_blobs(root, [f"{commit}:train_gpt.py" for commit in commits])
    except (OSError, subprocess.SubprocessError):
        return {}
    versions = {}
    for commit, blob in zip(commits, blobs):
        if blob is not None:
            versions.setdefault(blob.decode("utf-8", "replace"), f"train_gpt.py at commit {commit[:9]}")
    return versions


def committed_logs(root: Path = ROOT) -> list[tuple[str, str]]:
    """(path, text) of each *.txt under records/ as committed in HEAD, whatever the working tree holds now;
    [] without git or outside a clone."""
    if not _is_clone(root):
        return []
    try:
        entries = _git(root, "ls-tree", "-r", "-z", "HEAD", "--", "records").decode("utf-8", "replace").split("\0")
        files = [(meta.split()[2], path) for meta, _, path in (e.partition("\t") for e in entries if e)
                 if meta.split()[1] == "blob" and path.endswith(".txt")]
        blobs = _git_blobs(root, [sha for sha, _ in files])
    except (OSError, subprocess.SubprocessError):
        return []
    return [(path, blob.decode("utf-8", "replace")) for (_, path), blob in zip(files, blobs) if blob is not None]


def known_sources(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """{sha256: (where, text)} of the sources git vouches for: train_gpt.py at each commit of HEAD's history (so the
    working tree's train_gpt.py only where it is one of them) and the source embedded in each log under records/
    as committed in HEAD (an untracked or edited log is not trusted); {} without git or outside a clone."""
    found = dict(_git_versions(root))
    for path, text in committed_logs(root):
        source = parse_log(text)["source"]
        if source is not None:  # a text that is no log has none
            found.setdefault(source, f"the source of {path} as committed")
    return {hashlib.sha256(text.encode("utf-8")).hexdigest(): (where, text) for text, where in found.items()}


def fingerprint(parsed: dict) -> tuple:
    """One run's losses as printed, with their steps: (step, kind, loss) of each effective step line, not the
    times, so the same run under another name, or with its times edited, has the same fingerprint."""
    return tuple((e["step"], e["kind"], e["loss_str"]) for e in effective_steps(parsed))


def runs_held(logs) -> dict[tuple, list[Path]]:
    """{fingerprint: the resolved paths that print it} of (path, text) pairs; texts with no step line are left out."""
    held: dict[tuple, list[Path]] = {}
    for path, text in logs:
        key, resolved = fingerprint(parse_log(text)), Path(path).resolve()
        if key and resolved not in held.setdefault(key, []):
            held[key].append(resolved)
    return held


def logs_under(folder: Path) -> list[tuple[Path, str]]:
    """(path, text) of each *.txt under folder, as it is now."""
    return [(p, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(folder.rglob("*.txt"))]


def record_runs(root: Path = ROOT) -> dict[tuple, list[Path]]:
    """runs_held of the logs under root/records, as committed in HEAD and as present in the working tree."""
    return runs_held([(root / path, text) for path, text in committed_logs(root)] + logs_under(root / "records"))


def held_elsewhere(held: dict[tuple, list[Path]], parsed: dict, path) -> Path | None:
    """The first log in `held` with the same fingerprint as this one, at another resolved path; None if none."""
    here = Path(path).resolve()
    return next((p for p in held.get(fingerprint(parsed), []) if p != here), None)


def source_identity(parsed: dict, known: dict[str, tuple[str, str]]) -> tuple[bool, str]:
    """(whether the log's source is a known one, one phrase: which one, or how it differs from the closest)."""
    if parsed["computed_sha256"] in known:
        return True, f"identical to {known[parsed['computed_sha256']][0]}"
    if not known:
        return False, (f"not a known train_gpt.py (sha256 {parsed['computed_sha256'][:16]}...): no source is known "
                       "here (not a git clone, or no git)")
    ours = parsed["source"].splitlines()
    closest, where = max(((difflib.SequenceMatcher(None, text.splitlines(), ours, autojunk=False), where)
                          for where, text in known.values()), key=lambda pair: pair[0].ratio())
    changes = [op for op in closest.get_opcodes() if op[0] != "equal"]
    added = sum(j2 - j1 for _, _, _, j1, j2 in changes)
    removed = sum(i2 - i1 for _, i1, i2, _, _ in changes)
    places = ", ".join(f"{j1 + 1}-{max(j2, j1 + 1)}" for _, _, _, j1, j2 in changes[:5])
    more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
    return False, (f"not a known train_gpt.py (sha256 {parsed['computed_sha256'][:16]}...): against the closest, "
                   f"{where}, it adds {added} line(s) and removes {removed}, in {len(changes)} place(s) (its lines "
                   f"{places}{more})")


def _import_source(source_path: str, tag: str):
    name = f"_reproduced_train_gpt_{tag}"
    spec = importlib.util.spec_from_file_location(name, source_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the source runs
    spec.loader.exec_module(module)
    return module


def _log_config(path, module, argv: list[str]):
    """The log's own source's configuration for argv. Raises ReproduceError when that source refuses it."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            if hasattr(module, "resolve_config"):
                return module.resolve_config(argv, 1)
            return module.parse_config(argv)[0]  # sources older than resolve_config
    except SystemExit:  # argparse's refusal, printed on stderr
        why = errors.getvalue().strip() or "exit"
    except getattr(module, "UsageError", SystemExit) as e:
        why = str(e)
    raise ReproduceError(f"{path}: the log's own source refuses its header configuration: {why}")


def _run_first_steps(module, cfg, n_steps: int) -> list[str]:
    """Runs the trainer until every line for steps <= n_steps is printed; returns the printed lines."""
    lines: list[str] = []
    started = [False]  # the timed loop has begun: the untimed warm-up calls train_step before any step line

    def capture(line, *args, **kwargs):
        lines.append(line)
        m = LOG["step"].match(line)
        if m:
            started[0] = True
            if int(m.group(1)) > n_steps:
                raise _Stop

    trainer = module.Trainer(cfg, log=capture)
    trainer.log = capture
    trainer.setup()
    train_step = trainer.train_step

    def limited_train_step(step, *args, **kwargs):
        if started[0] and step >= n_steps:  # train_step(step) makes step + 1: nothing at or below n_steps is left
            raise _Stop
        return train_step(step, *args, **kwargs)

    trainer.train_step = limited_train_step
    try:
        trainer.run()
    except _Stop:
        pass
    return lines


# The child process that runs a log's source: `python records/verify.py CHILD_FLAG FOLDER`, where FOLDER holds the
# source (train_gpt.py) and request.json; it writes result.json there: kind ok (lines, device), usage or failed.
CHILD_FLAG = "--reproduce-child"


def _child_main(folder: str) -> int:
    request = json.loads(Path(folder, "request.json").read_text())
    path, threads = request["path"], request["threads"]
    try:
        module = _import_source(os.path.join(folder, "train_gpt.py"), request["tag"])
        flags = {s[2:] for a in module.build_parser()._actions for s in a.option_strings if s.startswith("--")}
        argv, device = reproduce_argv(request["parsed"], flags, os.path.join(folder, "logs"), request["device"],
                                      request["data"])
        cfg = _log_config(path, module, argv)
        if threads:
            torch.set_num_threads(threads)
        result = dict(kind="ok", lines=_run_first_steps(module, cfg, request["n_steps"]), device=device)
    except ReproduceError as e:
        result = dict(kind="usage", message=str(e))
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        result = dict(kind="usage", message=f"{path}: {e}") if type(e).__name__ == "UsageError" else \
            dict(kind="failed", message=f"the reproduction stopped with {type(e).__name__}: {first}")
    Path(folder, "result.json").write_text(json.dumps(result))
    return 0


def _rerun(path, parsed: dict, n_steps: int, device: str | None, threads: int | None) -> tuple[list[str], str]:
    """The lines the log's own source prints for its first n_steps steps on this machine, run in a child process,
    and the device used. Raises ReproduceError for bad input, _RunFailed (one line) when the run itself fails."""
    data = _log_data(path, parsed)
    with tempfile.TemporaryDirectory(prefix="verify_reproduce_") as tmp:
        Path(tmp, "train_gpt.py").write_text(parsed["source"], encoding="utf-8")
        header = {"header_order": parsed["header_order"], "header_all": {"device": parsed["header_all"].get("device",
                                                                                                           [])}}
        Path(tmp, "request.json").write_text(json.dumps(dict(
            path=str(path), parsed=header, n_steps=n_steps, device=device, threads=threads, data=data,
            tag=parsed["computed_sha256"][:16])))
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, tmp], cwd=os.getcwd(),
                               capture_output=True, text=True)
        result_path = Path(tmp, "result.json")
        if not result_path.exists():
            last = (child.stderr.strip().splitlines() or [f"exit code {child.returncode}"])[-1]
            raise _RunFailed(f"the reproduction's process stopped: {last}")
        result = json.loads(result_path.read_text())
    if result["kind"] == "usage":
        raise ReproduceError(result["message"])
    if result["kind"] == "failed":
        raise _RunFailed(result["message"])
    return result["lines"], result["device"]


def _step_lines(lines: list[str]) -> dict[tuple[str, int], dict]:
    """{(kind, step): the parsed step line} of the lines a reproduction printed."""
    got = {}
    for line in lines:
        with contextlib.suppress(ValueError):
            rec = parse_step_line(line)
            got[(rec["kind"], rec["step"])] = rec
    return got


def _compare(parsed: dict, lines: list[str], n_steps: int, tolerance: float | None, mode: str) -> dict:
    """Every logged loss at steps <= n_steps against the reproduced line's: ok, message, compared, max_diff."""
    got = _step_lines(lines)
    logged = [e for e in effective_steps(parsed) if e["step"] <= n_steps]
    extra = sorted(set(k for k in got if k[1] <= n_steps) - {(e["kind"], e["step"]) for e in logged})
    result = {"ok": False, "compared": 0, "max_diff": None}
    for e in logged:
        where = f"line {e['lineno']}: logged step:{e['step']}/{e['total']} {e['kind']}_loss:{e['loss_str']}"
        rec = got.get((e["kind"], e["step"]))
        if rec is None:
            return dict(result, message=f"{where}, reproduced: no such line ({mode})")
        a, b = e["loss"], rec["loss"]
        if math.isnan(a) or math.isnan(b):
            same = math.isnan(a) and math.isnan(b)
        else:
            allowed = tolerance if tolerance is not None else \
                min(TOLERANCE_BASE + TOLERANCE_PER_STEP * e["step"], TOLERANCE_MAX)
            same = e["loss_str"] == rec["loss_str"] if tolerance == 0 else abs(a - b) <= allowed + 1e-9
            result["max_diff"] = max(result["max_diff"] or 0.0, abs(a - b))
        result["compared"] += 1
        if not same:
            return dict(result, message=f"{where}, reproduced {e['kind']}_loss:{rec['loss_str']} ({mode})")
    if extra:
        return dict(result, message=f"reproduced a {extra[0][0]} line for step:{extra[0][1]} that the log lacks")
    last = min(n_steps, max((e["step"] for e in logged), default=0))
    return dict(result, ok=True, message=f"{result['compared']} losses at steps <= {last} match ({mode}; largest "
                f"difference {result['max_diff'] or 0.0:.4f})")


def _compare_time(parsed: dict, lines: list[str], n_steps: int, why_not: str) -> tuple[str | None, str | None]:
    """The logged train time at the last step <= n_steps that both printed against the reproduced one, as one
    phrase, and the reason to flag the log (or None): where the hardware is the same (why_not is empty) and the
    reproduction ran at least TIME_MIN_MS, a logged time more than TIME_NOISE below the reproduced one."""
    got = _step_lines(lines)
    pairs = [(e, got[(e["kind"], e["step"])]["train_time_ms"]) for e in effective_steps(parsed)
             if 0 < e["step"] <= n_steps and (e["kind"], e["step"]) in got]
    if not pairs:
        return None, None
    e, reproduced = pairs[-1]
    logged = e["train_time_ms"]
    phrase = f"logged {logged}ms at step:{e['step']}, reproduced {reproduced}ms"
    phrase += f" ({logged / reproduced:.2f}x)" if reproduced else ""
    if why_not:
        return f"{phrase}; not judged: {why_not}", None
    if not reproduced or reproduced < TIME_MIN_MS:
        return (f"{phrase}; not judged: the reproduction ran under {TIME_MIN_MS}ms by then (reproduce more "
                "steps)"), None
    below = 1 - logged / reproduced
    if below <= TIME_NOISE:
        return phrase, None
    return phrase, (f"the logged train time is {below:.0%} below the reproduction on the same hardware, more than "
                    f"the {TIME_NOISE:.0%} noise allowed; the log's times may be forged")


def reproduce(path, parsed: dict, n_steps: int, device: str | None = None, threads: int | None = None,
              tolerance: float | None = None) -> dict:
    """Re-creates the run from the log alone (its embedded source and header configuration), runs its first
    n_steps steps and compares every logged train and val loss at steps <= n_steps.

    Raises ReproduceError for bad input. Returns ok, message (one line), compared, seconds, exact, max_diff, and
    time (the train times compared, one phrase, or None) and time_flag (why the logged times look forged, or None)."""
    cpu = log_cpu(parsed)
    if threads is None and cpu:
        threads = cpu[2]
    started = time.perf_counter()
    try:
        lines, device = _rerun(path, parsed, n_steps, device, threads)
    except _RunFailed as e:
        return {"ok": False, "compared": 0, "seconds": time.perf_counter() - started, "exact": False,
                "max_diff": None, "message": str(e), "time": None, "time_flag": None}
    seconds = time.perf_counter() - started
    exact, why = same_machine(parsed, device)
    if exact and cpu and threads != cpu[2]:
        why_time = f"{threads} torch threads, the log's {cpu[2]}"
    else:
        why_time = why and f"other hardware ({why})"
    timing = _compare_time(parsed, lines, n_steps, why_time)
    if tolerance is None and exact:
        tolerance = 0.0
    if tolerance == 0:
        mode = "exact, same machine" if exact else "exact"
    elif tolerance is None:
        mode = f"within min({TOLERANCE_BASE:g} + {TOLERANCE_PER_STEP:g} x step, {TOLERANCE_MAX:g}); {why}"
    else:
        mode = f"within {tolerance:g}" + (f"; {why}" if why else "")
    result = dict(_compare(parsed, lines, n_steps, tolerance, mode), seconds=seconds, exact=tolerance == 0,
                  time=timing[0], time_flag=timing[1])
    if result["ok"]:
        result["message"] += f" in {seconds:.1f} s"
    return result


# ---------------------------------------------------------------- command line

class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line on stderr and exit code 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> OneLineParser:
    ap = OneLineParser(
        description="Verify train_gpt.py run logs (embedded code hash, step lines on the interval grid, outcome "
                    "line, metrics.jsonl), test that the mean final val loss of fixed-budget runs is below the "
                    "target, and optionally re-run each log's first steps.")
    ap.add_argument("logs", nargs="+", metavar="LOG", help="run log(s), e.g. logs/<run_id>.txt")
    ap.add_argument("--no-stats", action="store_true",
                    help="do not require p < 0.01 for exit code 0 (stats are still printed)")
    ap.add_argument("--target", type=float, default=None,
                    help="target val loss for the t-test (default: target_val_loss from each log's header)")
    ap.add_argument("--metrics_dir", default=None, metavar="DIR",
                    help="check printed numbers against DIR/<run_id>/metrics.jsonl (default: the metrics.jsonl "
                         "beside each log, <dir>/<run_id>/metrics.jsonl, when there is one)")
    ap.add_argument("--reproduce", type=int, default=None, metavar="N",
                    help="re-create each run from its log (embedded source, header configuration) and compare "
                         "every logged loss at steps <= N; runs the log's code in a child process")
    ap.add_argument("--run-unknown-code", action="store_true",
                    help="with --reproduce: also run a log whose source git does not vouch for: not train_gpt.py "
                         "at a commit of HEAD's history, nor the source of a log under records/ as committed in "
                         "HEAD (by default such a log is refused with a diff summary; without git, every log)")
    ap.add_argument("--device", default=None, help="with --reproduce: device to run on (default: the log's)")
    ap.add_argument("--threads", type=int, default=None,
                    help="with --reproduce: torch threads (default: the log's 'torch threads')")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="with --reproduce: largest loss difference accepted at any step (default: 0, the printed "
                         "digits equal, on the machine that wrote the log; elsewhere "
                         f"min({TOLERANCE_BASE:g} + {TOLERANCE_PER_STEP:g} x step, {TOLERANCE_MAX:g}))")
    return ap


def _verdict(r: dict) -> str:
    """The OK or FAIL line of one log."""
    if r["ok"]:
        kind = "ran max_iters" if r["budget"] == "fixed" else "stopped at the target"
        return (f"OK   {r['path']}: val_loss {r['final_val_loss']:.4f} at step:{r['step']} ({kind}) "
                f"time {_fmt_time(r['train_time_ms'])}" + (f" resumes {r['n_resumes']}" if r["n_resumes"] else "")
                + (" [metrics.jsonl checked]" if r["metrics"] else
                   " [no metrics.jsonl: the printed numbers are checked only against each other]"))
    last = "" if r["final_val_loss"] is None else \
        f" [last val_loss {r['final_val_loss']:.4f}, time {_fmt_time(r['train_time_ms'])}]"
    return f"FAIL {r['path']}: {r['reason']}{last}"


def _summary(s: dict) -> list[str]:
    lines = [f"verified {s['n']}/{s['n_total']} logs"]
    if s["n"]:
        loss_std = f"{s['loss_std']:.4f}" if s["loss_std"] is not None else "n/a"
        time_std = f"{s['time_std_s']:.2f}s" if s["time_std_s"] is not None else "n/a"
        lines.append(f"val_loss: mean {s['loss_mean']:.4f} std {loss_std}")
        lines.append(f"{'time to target' if s['n_stop'] else 'train time'}: mean {s['time_mean_s']:.2f}s "
                     f"std {time_std}")
    target = f"{s['target']:g}" if s["target"] is not None else "target"
    result = f"{s['p']:.3g} (t={s['t']:.3f}, n={s['n']})" if s["p"] is not None else f"n/a ({s['p_reason']})"
    return lines + [f"p-value (one-sided t-test, mean val_loss < {target}): {result}"]


def parse_args(argv):
    """The command line, its numbers checked (one line and exit code 2 when one is out of range)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.reproduce is not None and args.reproduce < 1:
        ap.error("--reproduce N needs N >= 1 (the number of steps to re-run)")
    if args.tolerance is not None and not 0 <= args.tolerance < math.inf:
        ap.error(f"--tolerance {args.tolerance}: give a finite number >= 0")
    if args.target is not None and not 0 <= args.target < math.inf:
        ap.error(f"--target {args.target}: give a finite val loss >= 0")
    return args


ONE_SEED_EACH = "each run of a record needs its own seed (the same seed on the same machine prints the same losses)"


def _check_copies(r: dict, earlier: dict, held: dict) -> None:
    """Fails a verified log whose losses (its fingerprint) are an earlier log's among those given, or those of a log
    under records/ at another path; earlier: {fingerprint: path} of the logs passed so far."""
    if not r["ok"]:
        return
    key = fingerprint(r["parsed"])
    if key in earlier:
        r.update(ok=False, reason=f"the same losses as {earlier[key]}: a copy of one run under another name; "
                                  f"{ONE_SEED_EACH}")
        return
    other = held_elsewhere(held, r["parsed"], r["path"])
    if other is not None:
        shown = other.relative_to(ROOT) if other.is_relative_to(ROOT) else other
        r.update(ok=False, reason=f"the same losses as {shown}, a run a record already holds: a copy of it under "
                                  f"another name; {ONE_SEED_EACH}")
        return
    earlier[key] = r["path"]


def _reproduce_one(args, path: str, r: dict, known: dict) -> int:
    """--reproduce for one verified log, its lines printed: 0 reproduced, 1 a mismatch or times that look forged,
    2 bad input (a source that is not known, without --run-unknown-code; missing data)."""
    is_known, identity = source_identity(r["parsed"], known)
    if not is_known and not args.run_unknown_code:
        print(f"error: {path}: not run: its source is {identity}; read it (above the log's line of '=') and "
              "add --run-unknown-code to run it in a child process", file=sys.stderr)
        return 2
    print(f"source {r['path']}: {identity}" + ("" if is_known else "; run (--run-unknown-code)"))
    try:
        rep = reproduce(path, r["parsed"], args.reproduce, args.device, args.threads, args.tolerance)
    except ReproduceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'REPRODUCED' if rep['ok'] else 'MISMATCH'} {r['path']}: {rep['message']}")
    if rep["time"]:
        print(f"time {r['path']}: {rep['time']}")
    if rep["time_flag"]:
        print(f"FLAG {r['path']}: {rep['time_flag']}")
    return 0 if rep["ok"] and not rep["time_flag"] else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        return _child_main(argv[1])
    args = parse_args(argv)
    missing = next((path for path in args.logs if not Path(path).is_file()), None)
    if missing is not None:
        what = "is a folder" if Path(missing).is_dir() else "no such file"
        print(f"error: {missing}: {what}; pass run logs such as logs/<run_id>.txt", file=sys.stderr)
        return 2
    if args.metrics_dir is not None and not Path(args.metrics_dir).is_dir():
        print(f"error: --metrics_dir {args.metrics_dir}: no such folder; pass the log folder, e.g. logs",
              file=sys.stderr)
        return 2
    results, reproduced_ok = [], True
    known = known_sources(ROOT) if args.reproduce is not None else {}
    held, earlier = record_runs(ROOT), {}
    for path in args.logs:
        r = verify_log(path, target=args.target, metrics_dir=args.metrics_dir)
        _check_copies(r, earlier, held)
        results.append(r)
        print(_verdict(r))
        if r["data_passes"]:
            passes = ", ".join(f"pass {p} at step:{s}" for p, s in r["data_passes"])
            print(f"note {r['path']}: the training data repeated ({passes})")
        if r["ok"] and args.reproduce is not None:
            code = _reproduce_one(args, path, r, known)
            if code == 2:
                return 2
            reproduced_ok = reproduced_ok and code == 0
    s = summarize(results, target=args.target)
    print("\n".join(_summary(s)))
    all_ok = all(r["ok"] for r in results) and reproduced_ok
    stats_ok = args.no_stats or (s["p"] is not None and s["p"] < P_MAX)
    if all_ok and not stats_ok:
        print(f"FAIL stats: p-value is not < {P_MAX} (use --no-stats to skip this requirement)")
    return 0 if (all_ok and stats_ok) else 1


if __name__ == "__main__":
    sys.exit(train_gpt.run_cli(main))  # a closed stdout (`| head`): exit code 1, quietly
