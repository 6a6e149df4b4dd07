#!/usr/bin/env python3
"""Verify run logs written by train_gpt.py, test a record's statistics, and re-run a log's first steps.

    python records/verify.py LOG [LOG ...]                 # structure, metrics.jsonl, t-test of the mean val loss
    python records/verify.py --reproduce 200 LOG [LOG ...]  # also re-run each log's first 200 steps and compare

A log is accepted when its embedded source hashes to its `code_sha256:` line, every step line parses, train_time
never decreases, the train and val lines sit exactly on the log_interval / eval_interval grid up to where the run
stopped, the outcome line agrees with the val lines, and (where logs/<run_id>/metrics.jsonl is given or found
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
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEPARATOR = "=" * 100
P_MAX = 0.01  # a record's mean final val loss must be below the target at this one-sided p-value

_SHA_RE = re.compile(r"^code_sha256:([0-9a-f]{64})$")
_HEADER_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\-/]*):(?:\s+(.*?))?\s*$")
_VERSIONS_RE = re.compile(r"^python:(\S+) torch:(\S+)(?: .*)?$")
_CPU_RE = re.compile(r"^(.*) \((\d+) logical cores?, torch threads (\d+)\)$")
_STEP_RE = re.compile(r"^step:(\d+)/(\d+)((?: \S+)*)$")
_TIME_RE = re.compile(r"^(\d+)ms$")
_MS_RE = re.compile(r"^(.+)ms$")
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity)"
_FLOAT_RE = re.compile(rf"^(?:{_NUM})$", re.IGNORECASE)
_RESUME_RE = re.compile(r"^resume from (.+) at step:(\d+) train_time:(\d+)ms$")
_CHECKPOINT_RE = re.compile(r"^checkpoint step:(\d+) train_time:(\d+)ms saved (.+)$")
_DATA_PASS_RE = re.compile(r"^data: pass (\d+) begins at step:(\d+)$")
_REACHED_RE = re.compile(r"^target val_loss (\S+) reached at step:(\d+) train_time:(\d+)ms$")
_NOT_REACHED_RE = re.compile(r"^target val_loss (\S+) not reached: best val_loss (\S+) at step:(\d+)$")

# header keys whose value must not change if they are printed more than once
_CRITICAL_KEYS = ("target_val_loss", "val_tokens", "tokens_per_step")
# header keys the step-line checks need
_GRID_KEYS = ("max_iters", "eval_interval", "log_interval")


def _parse_float(s: str) -> float:
    if not _FLOAT_RE.match(s):
        raise ValueError(f"not a number: {s!r}")
    return float(s)


def _decimals(s: str) -> int:
    return len(s.partition(".")[2]) if "." in s else 0


def _prints_as(full: float, printed: str) -> bool:
    """Whether the full-precision value, formatted with the printed string's decimals, is the printed string."""
    if isinstance(full, str) or full is None:
        return False
    if math.isnan(full) or math.isnan(_parse_float(printed)):
        return math.isnan(full) and math.isnan(_parse_float(printed))
    return f"{full:.{_decimals(printed)}f}" == printed


def _surely_below(printed: str, target: float) -> bool:
    """The value behind a printed number is below target whatever digits were rounded away."""
    return _parse_float(printed) + 0.5 * 10 ** -_decimals(printed) < target


def _surely_above(printed: str, target: float) -> bool:
    return _parse_float(printed) - 0.5 * 10 ** -_decimals(printed) > target


def parse_step_line(line: str) -> dict:
    """Parse one `step:...` line. Raises ValueError if it is malformed."""
    m = _STEP_RE.match(line)
    if not m:
        raise ValueError("malformed step line")
    step, total = int(m.group(1)), int(m.group(2))
    fields: dict[str, str] = {}
    for tok in m.group(3).split():
        key, sep, value = tok.partition(":")
        if not sep or not key or not value:
            raise ValueError(f"malformed field {tok!r}")
        if key in fields:
            raise ValueError(f"duplicate field {key!r}")
        fields[key] = value
    has_train, has_val = "train_loss" in fields, "val_loss" in fields
    if has_train == has_val:
        raise ValueError("step line must carry exactly one of train_loss/val_loss")
    kind = "val" if has_val else "train"
    for key in ("train_time", "step_avg"):
        if key not in fields:
            raise ValueError(f"missing field {key}")
    loss = _parse_float(fields[f"{kind}_loss"])
    tm = _TIME_RE.match(fields["train_time"])
    if not tm:
        raise ValueError(f"bad train_time {fields['train_time']!r}")
    sm = _MS_RE.match(fields["step_avg"])
    if not sm:
        raise ValueError(f"bad step_avg {fields['step_avg']!r}")
    step_avg = _parse_float(sm.group(1))
    if step > total:
        raise ValueError(f"step {step} exceeds total {total}")
    return {
        "kind": kind,
        "step": step,
        "total": total,
        "loss": loss,
        "loss_str": fields[f"{kind}_loss"],
        "train_time_ms": int(tm.group(1)),
        "train_time_str": tm.group(1),
        "step_avg_ms": step_avg,
        "extra": {k: v for k, v in fields.items() if k not in (f"{kind}_loss", "train_time", "step_avg")},
    }


def parse_log(text: str) -> dict:
    """Parse the text of a run log.

    Never raises on malformed content; problems are collected in `errors` (each a one-line description).
    Returned keys: source, code_sha256, computed_sha256, header (first value per key), header_all (every value
    per key), header_order ((key, value) in order), header_conflicts, versions (python/torch or None), events
    (ordered step/resume/checkpoint/final/data_pass records, each with `lineno`), steps, val, train, resumes,
    checkpoints, data_passes, final (None or dict), final_lines (count of `target val_loss` lines), last_line,
    errors. Header lines are the `key: value` lines between the `code_sha256:` line and the first step line.
    """
    out: dict = {
        "source": None, "code_sha256": None, "computed_sha256": None,
        "header": {}, "header_all": {}, "header_order": [], "header_conflicts": {}, "versions": None,
        "events": [], "steps": [], "val": [], "train": [], "resumes": [], "checkpoints": [], "data_passes": [],
        "final": None, "final_lines": 0, "last_line": None, "errors": [],
    }
    errors = out["errors"]

    # locate the first line that is exactly SEPARATOR
    lines = text.split("\n")
    sep_idx = None
    offset = 0
    for i, line in enumerate(lines):
        if line == SEPARATOR:
            sep_idx = i
            break
        offset += len(line) + 1
    if sep_idx is None:
        errors.append("no separator line of 100 '=' found")
        body_start = 0
    else:
        source = text[:offset]
        out["source"] = source
        out["computed_sha256"] = hashlib.sha256(source.encode("utf-8")).hexdigest()
        body_start = sep_idx + 1
        sha_line = lines[body_start] if body_start < len(lines) else ""
        m = _SHA_RE.match(sha_line)
        if m:
            out["code_sha256"] = m.group(1)
            body_start += 1
        else:
            errors.append("line after the separator is not 'code_sha256:<64 hex>'")

    header, in_header = out["header"], True
    for lineno0 in range(body_start, len(lines)):
        lineno = lineno0 + 1
        line = lines[lineno0].rstrip("\r")
        if line.strip():
            out["last_line"] = (lineno, line)
        if line.startswith("step:"):
            in_header = False
            try:
                rec = parse_step_line(line)
            except ValueError as e:
                errors.append(f"line {lineno}: unparseable step line ({e}): {line[:120]!r}")
                continue
            rec["type"] = "step"
            rec["lineno"] = lineno
            out["events"].append(rec)
            out["steps"].append(rec)
            out[rec["kind"]].append(rec)
            continue
        m = _RESUME_RE.match(line)
        if m:
            rec = {"type": "resume", "path": m.group(1), "step": int(m.group(2)),
                   "train_time_ms": int(m.group(3)), "lineno": lineno}
            out["events"].append(rec)
            out["resumes"].append(rec)
            continue
        m = _CHECKPOINT_RE.match(line)
        if m:
            rec = {"type": "checkpoint", "step": int(m.group(1)), "saved_time_ms": int(m.group(2)),
                   "path": m.group(3), "lineno": lineno}
            out["events"].append(rec)
            out["checkpoints"].append(rec)
            continue
        m = _DATA_PASS_RE.match(line)
        if m:
            rec = {"type": "data_pass", "pass": int(m.group(1)), "step": int(m.group(2)), "lineno": lineno}
            out["events"].append(rec)
            out["data_passes"].append(rec)
            continue
        if line.startswith("target val_loss "):
            out["final_lines"] += 1
            m = _REACHED_RE.match(line)
            if m:
                rec = {"type": "final", "reached": True, "target_str": m.group(1),
                       "step": int(m.group(2)), "train_time_ms": int(m.group(3)),
                       "lineno": lineno}
            else:
                m = _NOT_REACHED_RE.match(line)
                if m:
                    rec = {"type": "final", "reached": False, "target_str": m.group(1),
                           "best_val_loss_str": m.group(2), "step": int(m.group(3)),
                           "lineno": lineno}
                else:
                    errors.append(f"line {lineno}: malformed target line: {line[:120]!r}")
                    continue
            out["events"].append(rec)
            out["final"] = rec
            continue
        if not in_header:
            continue
        m = _VERSIONS_RE.match(line)
        if m and out["versions"] is None:
            out["versions"] = {"python": m.group(1), "torch": m.group(2), "line": line}
            continue
        m = _HEADER_RE.match(line)
        if m:
            key, value = m.group(1), m.group(2) or ""
            out["header_order"].append((key, value))
            out["header_all"].setdefault(key, []).append(value)
            if key not in header:
                header[key] = value
            elif key in _CRITICAL_KEYS and header[key] != value:
                out["header_conflicts"].setdefault(key, [header[key]]).append(value)
    return out


def header_float(header: dict, key: str):
    if key not in header:
        return None
    try:
        return _parse_float(header[key].split()[0])
    except (ValueError, IndexError):
        return None


def header_int(header: dict, key: str):
    value = header_float(header, key)
    return int(value) if value is not None and math.isfinite(value) and value == int(value) else None


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


def _grid(upto: int, max_iters: int, eval_interval: int, log_interval: int):
    """(step, kind) of every line a run that reached step `upto` prints, in the order it prints them."""
    for s in range(upto + 1):
        if s > 0 and (s % log_interval == 0 or s == max_iters):
            yield s, "train"
        if (eval_interval > 0 and s % eval_interval == 0) or s == max_iters:
            yield s, "val"


def _line_after(parsed: dict, lineno: int) -> int:
    later = [ev["lineno"] for ev in parsed["events"] if ev["lineno"] > lineno]
    if later:
        return min(later)
    return parsed["last_line"][0] if parsed["last_line"] else lineno


def _check_grid(parsed: dict, eff: list[dict], grid: dict, target: float) -> str | None:
    """Every train line at each log_interval step, every val line at each eval_interval step and at max_iters,
    in order, nothing else, and no val line below the target before the last one."""
    max_iters, eval_interval, log_interval = grid["max_iters"], grid["eval_interval"], grid["log_interval"]
    for e in eff:
        if e["total"] != max_iters:
            return f"line {e['lineno']}: step:{e['step']}/{e['total']} but the header's max_iters is {max_iters}"
    upto = max(e["step"] for e in eff)
    expected = list(_grid(upto, max_iters, eval_interval, log_interval))
    every = {"train": f"log_interval {log_interval}", "val": f"eval_interval {eval_interval}"}
    for i, (have, want) in enumerate(itertools.zip_longest(eff, expected)):
        if want is None:
            return f"line {have['lineno']}: unexpected {have['kind']} line for step:{have['step']}"
        if have is None:
            last = eff[-1]["lineno"]
            return (f"line {_line_after(parsed, last)}: the {want[1]} line for step:{want[0]} is missing before "
                    f"this line ({want[1]} lines come every {every[want[1]]} steps and at max_iters {max_iters})")
        if (have["step"], have["kind"]) == want:
            continue
        order = {"train": 0, "val": 1}
        if (have["step"], order[have["kind"]]) > (want[0], order[want[1]]):
            return (f"line {have['lineno']}: the {want[1]} line for step:{want[0]} is missing before this line "
                    f"({want[1]} lines come every {every[want[1]]} steps and at max_iters {max_iters})")
        return (f"line {have['lineno']}: {have['kind']} line for step:{have['step']} is off the grid or repeated "
                f"(expected the {want[1]} line for step:{want[0]}; {every[have['kind']]})")
    if target > 0:
        vals = [e for e in eff if e["kind"] == "val"]
        for e in vals[:-1]:
            if _surely_below(e["loss_str"], target):
                return (f"line {e['lineno']}: val_loss {e['loss_str']} at step:{e['step']} is below the target "
                        f"{target:g}, so the run stops here, yet the log goes on")
    return None


def read_metrics(path: Path) -> tuple[list[dict] | None, str | None]:
    """The rows of a metrics.jsonl, or None and a one-line reason."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path}: cannot read ({e})"
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return None, f"{path} line {n}: not JSON"
        if isinstance(row, dict):
            rows.append(row)
    return rows, None


def _check_metrics(eff: list[dict], rows: list[dict], name: str, target: float) -> str | None:
    """Each step line against the last metrics row for the same step and kind (a resumed run appends the rows of
    the steps it repeats, so the last row is the one the finished run printed)."""
    latest: dict = {}
    for row in rows:
        for kind in ("train", "val"):
            if f"{kind}_loss" in row and isinstance(row.get("step"), int):
                latest[(kind, row["step"])] = row
    vals = [e for e in eff if e["kind"] == "val"]
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
        if kind == "val" and target > 0 and e is not vals[-1] and float(full) <= target:
            return (f"line {e['lineno']}: val_loss {full!r} at step:{step} ({name}) is at or below the target "
                    f"{target:g}, so the run stops here, yet the log goes on")
    return None


def _fmt_like(full, printed: str) -> str:
    try:
        return f"{float(full):.{_decimals(printed)}f}"
    except (TypeError, ValueError):
        return "nothing"


def _check_outcome(parsed: dict, eff: list[dict], grid: dict, target: float) -> str | None:
    final = parsed["final"]
    vals = [e for e in eff if e["kind"] == "val"]
    last_val = vals[-1]
    if final["reached"]:
        if last_val["step"] != final["step"]:
            return (f"line {final['lineno']}: the outcome line names step:{final['step']} but the last val line "
                    f"(line {last_val['lineno']}) is at step:{last_val['step']}")
        if last_val["train_time_ms"] != final["train_time_ms"]:
            return (f"line {final['lineno']}: the outcome line's train_time {final['train_time_ms']}ms differs "
                    f"from the last val line's {last_val['train_time_ms']}ms (line {last_val['lineno']})")
        if target <= 0 or _surely_above(last_val["loss_str"], target):
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
    for e in vals:
        if e["loss"] < best_value:
            return (f"line {e['lineno']}: val_loss {e['loss_str']} at step:{e['step']} is below the best val_loss "
                    f"{best} that the outcome line (line {final['lineno']}) reports")
    if not any(e["loss"] == best_value and e["step"] == final["step"] for e in vals):
        return (f"line {final['lineno']}: the outcome line's best val_loss {best} at step:{final['step']} is not "
                "what any val line printed")
    return None


def metrics_path_for(log_path: Path, parsed: dict, metrics_dir=None) -> Path | None:
    """logs/<run_id>/metrics.jsonl under metrics_dir, else <dir>/<stem>/metrics.jsonl beside the log."""
    names = [log_path.stem]
    run_id = parsed["header"].get("run_id")
    if run_id and run_id not in names:
        names.append(run_id)
    base = Path(metrics_dir) if metrics_dir is not None else log_path.parent
    for name in names if metrics_dir is not None else names[:1]:
        candidate = base / name / "metrics.jsonl"
        if candidate.is_file():
            return candidate
    return None


def _check(parsed: dict, target_override: float | None, metrics=None) -> tuple[str | None, dict]:
    """Return (reason or None, facts). facts holds what could be read. metrics: (rows, name) or None."""
    facts: dict = {}
    header = parsed["header"]
    facts["val_tokens"] = header.get("val_tokens")
    facts["header_target"] = header_float(header, "target_val_loss")
    facts["target"] = target_override if target_override is not None else facts["header_target"]
    facts["data_passes"] = [(d["pass"], d["step"]) for d in parsed["data_passes"]]
    eff = effective_steps(parsed)
    vals = [e for e in eff if e["kind"] == "val"]
    if vals:
        facts["final_val_loss"] = vals[-1]["loss"]
        facts["step"] = vals[-1]["step"]
        facts["train_time_ms"] = vals[-1]["train_time_ms"]
    grid = {k: header_int(header, k) for k in _GRID_KEYS}
    facts["max_iters"] = grid["max_iters"]
    if vals and grid["max_iters"] is not None:
        facts["budget"] = "fixed" if vals[-1]["step"] == grid["max_iters"] else "stop"

    if parsed["source"] is None:
        return "no separator line of 100 '=' after the embedded source", facts
    if parsed["code_sha256"] is None:
        return "missing or malformed code_sha256 line after the separator", facts
    if parsed["computed_sha256"] != parsed["code_sha256"]:
        return (f"code sha256 mismatch: embedded source hashes to {parsed['computed_sha256'][:16]}..., "
                f"log claims {parsed['code_sha256'][:16]}..."), facts
    if parsed["errors"]:
        return parsed["errors"][0], facts
    if parsed["header_conflicts"]:
        key, values = next(iter(parsed["header_conflicts"].items()))
        return f"header key {key} printed with conflicting values {values}", facts

    # train_time never decreases; steps never decrease between resume markers
    prev_time, prev_time_line = -1, None
    min_step, prev_step_line = -1, None
    saved = set()  # (step, train_time, path) of every checkpoint written so far
    for ev in parsed["events"]:
        if ev["type"] == "checkpoint":
            saved.add((ev["step"], ev["saved_time_ms"], ev["path"]))
        t = ev.get("train_time_ms")
        if ev["type"] == "resume":
            # A resumed run continues from a checkpoint this log recorded: the clock and the step go back to it
            # (work done after that checkpoint by the interrupted process is discarded).
            if (ev["step"], t, ev["path"]) not in saved:
                return (f"line {ev['lineno']}: resume from a checkpoint (step {ev['step']}, {t}ms) that this "
                        "log never saved"), facts
            prev_time, prev_time_line = t, ev["lineno"]
        elif t is not None:
            if t < prev_time:
                return (f"line {ev['lineno']}: train_time {t}ms decreases "
                        f"(was {prev_time}ms at line {prev_time_line})"), facts
            prev_time, prev_time_line = t, ev["lineno"]
        if ev["type"] == "resume":
            min_step, prev_step_line = ev["step"], ev["lineno"]
        elif ev["type"] == "step":
            if ev["step"] < min_step:
                return (f"line {ev['lineno']}: step {ev['step']} goes back "
                        f"(was {min_step} at line {prev_step_line})"), facts
            min_step, prev_step_line = ev["step"], ev["lineno"]

    final = parsed["final"]
    if final is None:
        if parsed["final_lines"] == 0:
            return "no final 'target val_loss ...' line (incomplete run?)", facts
        return "malformed final 'target val_loss ...' line", facts
    if parsed["final_lines"] != 1:
        return f"{parsed['final_lines']} 'target val_loss' lines, expected exactly 1", facts
    if parsed["last_line"] is None or parsed["last_line"][0] != final["lineno"]:
        return f"line {parsed['last_line'][0]}: output after the final 'target val_loss' line", facts

    header_target = facts["header_target"]
    if header_target is None:
        return ("no 'target_val_loss:' header line (or an unparseable one): the outcome line cannot be "
                "checked"), facts
    try:
        printed_target = _parse_float(final["target_str"])
    except ValueError:
        return f"unparseable target in final line: {final['target_str']!r}", facts
    decimals = _decimals(final["target_str"])
    if round(header_target, decimals) != round(printed_target, decimals):
        return (f"line {final['lineno']}: final line target {final['target_str']} disagrees with header "
                f"target_val_loss {header['target_val_loss']}"), facts
    for key in _GRID_KEYS:
        if grid[key] is None:
            return f"no '{key}:' header line (or not an integer): the step lines cannot be checked", facts
    if grid["log_interval"] <= 0 or grid["max_iters"] <= 0 or grid["eval_interval"] < 0:
        return f"header intervals out of range: {grid}", facts
    if not vals:
        return "no val lines", facts

    reason = _check_grid(parsed, eff, grid, header_target)
    if reason is None and metrics is not None:
        rows, name = metrics
        reason = _check_metrics(eff, rows, name, header_target)
    if reason is None:
        reason = _check_outcome(parsed, eff, grid, header_target)
    return reason, facts


def verify_log(path, target: float | None = None, metrics_dir=None, text: str | None = None) -> dict:
    """Verify one log file. Never raises for bad input; see `ok` and `reason`.

    target: the target for the t-test (default: the log's target_val_loss). metrics_dir: where
    <run_id>/metrics.jsonl lives (default: beside the log, if there). Returned keys: path, ok, reason,
    final_val_loss, train_time_ms, step, max_iters, budget ("fixed": ran to max_iters, "stop": stopped at the
    target), target, header_target, val_tokens, code_sha256, n_resumes, metrics (the metrics file checked, or
    None), data_passes ((pass, step) pairs), parsed.
    """
    path = Path(path)
    result = {
        "path": str(path), "ok": False, "reason": None, "final_val_loss": None, "train_time_ms": None,
        "step": None, "max_iters": None, "budget": None, "target": target, "header_target": None,
        "val_tokens": None, "code_sha256": None, "n_resumes": 0, "metrics": None, "data_passes": [],
        "parsed": None,
    }
    if text is None:
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            result["reason"] = f"cannot read file ({e.strerror or e})"
            return result
        except UnicodeDecodeError as e:
            result["reason"] = f"not valid UTF-8 ({e.reason} at byte {e.start})"
            return result
    parsed = parse_log(text)
    result["parsed"] = parsed
    metrics = None
    mpath = metrics_path_for(path, parsed, metrics_dir)
    if mpath is None and metrics_dir is not None:
        result["reason"] = (f"no <run_id>/metrics.jsonl for this log under {metrics_dir} "
                            f"(looked for {path.stem}/metrics.jsonl)")
        return result
    if mpath is not None:
        rows, problem = read_metrics(mpath)
        if problem:
            result["reason"] = problem
            return result
        metrics = (rows, str(mpath))
        result["metrics"] = str(mpath)
    reason, facts = _check(parsed, target, metrics)
    result.update(facts)
    result["code_sha256"] = parsed["code_sha256"]
    result["n_resumes"] = len(parsed["resumes"])
    result["reason"] = reason
    result["ok"] = reason is None
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
        out["p_reason"] = "no verified logs"
        return out
    import numpy as np
    from scipy import stats

    losses = np.array([r["final_val_loss"] for r in ok], dtype=float)
    times = np.array([r["train_time_ms"] / 1000.0 for r in ok], dtype=float)
    out["loss_mean"], out["time_mean_s"] = float(losses.mean()), float(times.mean())
    if n > 1:
        out["loss_std"], out["time_std_s"] = float(losses.std(ddof=1)), float(times.std(ddof=1))
    stop = [r for r in ok if r["budget"] != "fixed"]
    out["n_stop"] = len(stop)
    if target is None:
        targets = {r["header_target"] for r in ok}
        if len(targets) != 1:
            out["p_reason"] = f"logs have different targets {sorted(targets)}; pass --target"
            return out
        target = targets.pop()
        out["target"] = target
    if stop:
        r = stop[0]
        out["p_reason"] = (f"{len(stop)} of {n} runs stopped at the target before max_iters, e.g. at step:{r['step']} "
                           f"of {r['max_iters']}, so their final val losses sit at or just below it by construction; "
                           "a record runs its whole max_iters budget, see records/README.md")
        return out
    if not target or target <= 0:
        out["p_reason"] = "the logs' target_val_loss is 0 (no target); pass --target X"
        return out
    if n < 2:
        out["p_reason"] = "n=1, need at least 2 runs"
        return out
    if losses.max() == losses.min():
        out["p_reason"] = "zero variance in val losses"
        return out
    res = stats.ttest_1samp(losses, target, alternative="less")
    p, t = float(res.pvalue), float(res.statistic)
    if math.isnan(p):
        out["p_reason"] = "t-test returned nan"
        return out
    out["p"], out["t"] = p, t
    return out


def _fmt_time(ms) -> str:
    if ms is None:
        return "n/a"
    return f"{ms / 1000:.2f}s ({ms / 60000:.2f} min)"


# ---------------------------------------------------------------- reproduction

# How to make the data a log names, by the folder its shards are in.
DATA_HINTS = {
    "tinyshakespeare_char": "python data/shakespeare.py --source tinyshakespeare --out_dir data/tinyshakespeare_char"
                            " (add --input FILE to use a local copy of tinyshakespeare.txt)",
    "shakespeare_char": "python data/shakespeare.py",
    "shakespeare_gpt2": "python data/shakespeare.py --mode gpt2",
    "fineweb10B": "python data/cached_fineweb10B.py",
}
# Header keys that are not part of the run's recipe: where it logged, whether it resumed or reported to wandb.
REPRODUCE_DROP = ("run_id", "log_dir", "resume", "wandb", "wandb_project", "wandb_run_name", "save_every")
# Largest difference allowed between a logged and a reproduced loss at step s when the reproducing machine is not
# the one that wrote the log: min(TOLERANCE_BASE + TOLERANCE_PER_STEP * s, TOLERANCE_MAX) (records/README.md gives
# the measurements behind these figures).
TOLERANCE_BASE = 0.001
TOLERANCE_PER_STEP = 0.00015
TOLERANCE_MAX = 0.05


class ReproduceError(Exception):
    """Bad input for --reproduce (missing data, a configuration the log's own source refuses): exit code 2."""


class _Stop(Exception):
    """Raised inside the trainer once every step up to the requested one has been reproduced."""


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
    for folder, command in DATA_HINTS.items():
        if folder in Path(pattern).parts:
            return command
    return None


def same_machine(parsed: dict, device: str) -> tuple[bool, str]:
    """Whether this machine is the one that wrote the log: a CPU run, the same CPU model and core count, the same
    python and torch. Returns (same, why not)."""
    import torch

    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    import train_gpt  # its cpu_model() wrote the log's cpu line

    m = _CPU_RE.match(parsed["header"].get("cpu", ""))
    if device != "cpu" or m is None:
        return False, "not a CPU run on both sides"
    model, cores = train_gpt.cpu_model(), os.cpu_count() or 0
    if (m.group(1), int(m.group(2))) != (model, cores):
        return False, f"the log's CPU is '{m.group(1)}' ({m.group(2)} cores), this one '{model}' ({cores} cores)"
    versions = parsed["versions"] or {}
    here = {"python": platform.python_version(), "torch": torch.__version__}
    for key, value in here.items():
        if versions.get(key) != value:
            return False, f"the log has {key} {versions.get(key)}, this machine {value}"
    return True, ""


def reproduce_argv(parsed: dict, flags: set, log_dir: str, device: str | None, data: dict) -> tuple[list, str]:
    """--key=value for the header's configuration keys that are flags of the log's own parser."""
    argv, seen = [], set()
    for key, value in parsed["header_order"]:
        if key in seen or key not in flags or key in REPRODUCE_DROP or value == "None":
            continue
        seen.add(key)
        if key in data:
            value = data[key]
        if key == "device":
            continue
        argv.append(f"--{key}={value}")
    if device is None:
        logged = [v for v in parsed["header_all"].get("device", []) if v]
        device = logged[0].split(":")[0] if logged else "cpu"
    argv.append(f"--device={device}")
    argv.append(f"--log_dir={log_dir}")
    for key, value in (("run_id", "reproduce"), ("save_every", "0")):
        if key in flags:
            argv.append(f"--{key}={value}")
    return argv, device


def _import_source(source: str, folder: str, tag: str):
    path = os.path.join(folder, "train_gpt.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    name = f"_reproduced_train_gpt_{tag}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the source runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module, name


def _run_first_steps(module, cfg, n_steps: int) -> list[str]:
    """Runs the trainer until every line for steps <= n_steps is printed; returns the printed lines."""
    lines: list[str] = []
    started = [False]  # the timed loop has begun: the untimed warm-up calls train_step before any step line

    def capture(line, *args, **kwargs):
        lines.append(line)
        m = _STEP_RE.match(line)
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


def reproduce(path, parsed: dict, n_steps: int, device: str | None = None, threads: int | None = None,
              tolerance: float | None = None) -> dict:
    """Re-creates the run from the log alone (its embedded source and header configuration), runs its first
    n_steps steps and compares every logged train and val loss at steps <= n_steps.

    Raises ReproduceError for bad input. Returns ok, message (one line), compared, seconds, exact, max_diff."""
    import torch

    data = {}
    for key in ("input_bin", "input_val_bin"):
        pattern = parsed["header"].get(key)
        if not pattern:
            raise ReproduceError(f"{path}: no '{key}:' header line, so the data cannot be found")
        found = find_data(pattern)
        if found is None:
            hint = data_hint(pattern) or "a script in data/ (python data/shakespeare.py --help lists its options)"
            raise ReproduceError(f"{path}: the log's {key} {pattern} matches no file here; make the data with "
                                 f"{hint}")
        data[key] = found
    used_threads = None
    m = _CPU_RE.match(parsed["header"].get("cpu", ""))
    if threads is None and m:
        threads = int(m.group(3))
    started = time.perf_counter()
    old_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="verify_reproduce_") as tmp:
        module, name = _import_source(parsed["source"], tmp, parsed["computed_sha256"][:16])
        try:
            flags = {s[2:] for a in module.build_parser()._actions for s in a.option_strings if s.startswith("--")}
            argv, device = reproduce_argv(parsed, flags, os.path.join(tmp, "logs"), device, data)
            errors = io.StringIO()
            try:
                with contextlib.redirect_stderr(errors):
                    if hasattr(module, "resolve_config"):
                        cfg = module.resolve_config(argv, 1)
                    else:
                        cfg, _ = module.parse_config(argv)
            except SystemExit:
                raise ReproduceError(f"{path}: the log's own source refuses its header configuration: "
                                     f"{errors.getvalue().strip() or 'exit'}") from None
            if threads:
                torch.set_num_threads(threads)
                used_threads = threads
            try:
                lines = _run_first_steps(module, cfg, n_steps)
            except Exception as e:
                if type(e).__name__ == "UsageError":
                    raise ReproduceError(f"{path}: {e}") from None
                return {"ok": False, "compared": 0, "seconds": time.perf_counter() - started, "exact": False,
                        "max_diff": None,
                        "message": f"the reproduction stopped with {type(e).__name__}: {str(e).splitlines()[0]}"}
        finally:
            sys.modules.pop(name, None)
            torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - started

    exact, why = same_machine(parsed, device)
    if tolerance is None and exact:
        tolerance = 0.0
    if tolerance == 0:
        mode = "exact, same machine" if exact else "exact"
    elif tolerance is None:
        mode = f"within min({TOLERANCE_BASE:g} + {TOLERANCE_PER_STEP:g} x step, {TOLERANCE_MAX:g}); {why}"
    else:
        mode = f"within {tolerance:g}" + (f"; {why}" if why else "")

    def allowed(step):
        if tolerance is None:
            return min(TOLERANCE_BASE + TOLERANCE_PER_STEP * step, TOLERANCE_MAX)
        return tolerance

    got = {}
    for line in lines:
        if line.startswith("step:"):
            try:
                rec = parse_step_line(line)
            except ValueError:
                continue
            got[(rec["kind"], rec["step"])] = rec
    logged = [e for e in effective_steps(parsed) if e["step"] <= n_steps]
    keys = {(e["kind"], e["step"]) for e in logged}
    max_diff = 0.0
    result = {"compared": 0, "seconds": seconds, "exact": tolerance == 0, "max_diff": None, "threads": used_threads,
              "diffs": []}
    for e in logged:
        where = f"line {e['lineno']}: logged step:{e['step']}/{e['total']} {e['kind']}_loss:{e['loss_str']}"
        rec = got.get((e["kind"], e["step"]))
        if rec is None:
            return {**result, "ok": False, "message": f"{where}, reproduced: no such line ({mode})"}
        a, b = e["loss"], rec["loss"]
        if math.isnan(a) or math.isnan(b):
            same = math.isnan(a) and math.isnan(b)
        else:
            same = e["loss_str"] == rec["loss_str"] if tolerance == 0 else abs(a - b) <= allowed(e["step"]) + 1e-9
            max_diff = max(max_diff, abs(a - b))
            result["diffs"].append((e["kind"], e["step"], a - b))
        result["compared"] += 1
        result["max_diff"] = max_diff
        if not same:
            return {**result, "ok": False,
                    "message": f"{where}, reproduced {e['kind']}_loss:{rec['loss_str']} ({mode})"}
    extra = sorted(k for k in got if k[1] <= n_steps and k not in keys)
    if extra:
        kind, step = extra[0]
        return {**result, "ok": False, "message": f"reproduced a {kind} line for step:{step} that the log lacks"}
    last = min(n_steps, max((e["step"] for e in logged), default=0))
    return {**result, "ok": True,
            "message": f"{result['compared']} losses at steps <= {last} match ({mode}; largest difference "
                       f"{max_diff:.4f}) in {seconds:.1f} s"}


# ---------------------------------------------------------------- command line

class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line on stderr and exit code 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
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
                         "every logged loss at steps <= N; runs the log's code")
    ap.add_argument("--device", default=None, help="with --reproduce: device to run on (default: the log's)")
    ap.add_argument("--threads", type=int, default=None,
                    help="with --reproduce: torch threads (default: the log's 'torch threads')")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="with --reproduce: largest loss difference accepted at any step (default: 0, the printed "
                         "digits equal, on the machine that wrote the log; elsewhere "
                         f"min({TOLERANCE_BASE:g} + {TOLERANCE_PER_STEP:g} x step, {TOLERANCE_MAX:g}))")
    args = ap.parse_args(argv)
    if args.reproduce is not None and args.reproduce < 1:
        ap.error("--reproduce N needs N >= 1 (the number of steps to re-run)")
    for path in args.logs:
        if not Path(path).is_file():
            print(f"error: {path}: no such file; pass run logs such as logs/<run_id>.txt", file=sys.stderr)
            return 2
    if args.metrics_dir is not None and not Path(args.metrics_dir).is_dir():
        print(f"error: --metrics_dir {args.metrics_dir}: no such folder; pass the log folder, e.g. logs",
              file=sys.stderr)
        return 2

    results, reproduced_ok = [], True
    for path in args.logs:
        r = verify_log(path, target=args.target, metrics_dir=args.metrics_dir)
        results.append(r)
        if r["ok"]:
            kind = "ran max_iters" if r["budget"] == "fixed" else "stopped at the target"
            print(f"OK   {r['path']}: val_loss {r['final_val_loss']:.4f} at step:{r['step']} ({kind}) "
                  f"time {_fmt_time(r['train_time_ms'])}"
                  + (f" resumes {r['n_resumes']}" if r["n_resumes"] else "")
                  + (" [metrics.jsonl checked]" if r["metrics"] else ""))
        else:
            extra = ""
            if r["final_val_loss"] is not None:
                extra = f" [last val_loss {r['final_val_loss']:.4f}, time {_fmt_time(r['train_time_ms'])}]"
            print(f"FAIL {r['path']}: {r['reason']}{extra}")
        if r["data_passes"]:
            passes = ", ".join(f"pass {p} at step:{s}" for p, s in r["data_passes"])
            print(f"note {r['path']}: the training data repeated ({passes})")
        if r["ok"] and args.reproduce is not None:
            try:
                rep = reproduce(path, r["parsed"], args.reproduce, args.device, args.threads, args.tolerance)
            except ReproduceError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(f"{'REPRODUCED' if rep['ok'] else 'MISMATCH'} {r['path']}: {rep['message']}")
            reproduced_ok = reproduced_ok and rep["ok"]

    s = summarize(results, target=args.target)
    print(f"verified {s['n']}/{s['n_total']} logs")
    if s["n"]:
        loss_std = f"{s['loss_std']:.4f}" if s["loss_std"] is not None else "n/a"
        time_std = f"{s['time_std_s']:.2f}s" if s["time_std_s"] is not None else "n/a"
        what = "time to target" if s["n_stop"] else "train time"
        print(f"val_loss: mean {s['loss_mean']:.4f} std {loss_std}")
        print(f"{what}: mean {s['time_mean_s']:.2f}s std {time_std}")
    tgt = f"{s['target']:g}" if s["target"] is not None else "target"
    if s["p"] is not None:
        print(f"p-value (one-sided t-test, mean val_loss < {tgt}): {s['p']:.3g} (t={s['t']:.3f}, n={s['n']})")
    else:
        print(f"p-value (one-sided t-test, mean val_loss < {tgt}): n/a ({s['p_reason']})")

    all_ok = all(r["ok"] for r in results) and reproduced_ok
    stats_ok = args.no_stats or (s["p"] is not None and s["p"] < P_MAX)
    if all_ok and not stats_ok:
        print(f"FAIL stats: p-value is not < {P_MAX} (use --no-stats to skip this requirement)")
    return 0 if (all_ok and stats_ok) else 1


if __name__ == "__main__":
    sys.exit(main())
