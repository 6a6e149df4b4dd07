#!/usr/bin/env python3
"""Verify speedrun logs written by train_gpt.py and summarise them.

A log is accepted when:
  * the source block before the first line of exactly 100 '=' hashes to the
    value on the `code_sha256:` line that follows it,
  * every line starting with `step:` parses as a train or val step line,
  * train_time never decreases (step lines, resume markers, final line),
  * within each stretch between resume markers the step never decreases,
  * the last non-empty line is `target val_loss X reached at step:N train_time:Tms`
    (and it is the only `target val_loss` line), with X matching the header's
    `target_val_loss`,
  * the last val line is at step N with train_time T and its printed val_loss
    is <= the target.

Across the accepted logs it prints the mean/std of final val losses and times
and the p-value of a one-sided one-sample t-test that the mean val loss is
below the target.

Usage: python records/verify.py LOG [LOG ...] [--no-stats] [--target X]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
from pathlib import Path

SEPARATOR = "=" * 100

_SHA_RE = re.compile(r"^code_sha256:([0-9a-f]{64})$")
_HEADER_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\-/]*):\s+(.*?)\s*$")
_STEP_RE = re.compile(r"^step:(\d+)/(\d+)((?: \S+)*)$")
_TIME_RE = re.compile(r"^(\d+)ms$")
_MS_RE = re.compile(r"^(.+)ms$")
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity)"
_FLOAT_RE = re.compile(rf"^(?:{_NUM})$", re.IGNORECASE)
_RESUME_RE = re.compile(r"^resume from (.+) at step:(\d+) train_time:(\d+)ms$")
_CHECKPOINT_RE = re.compile(r"^checkpoint step:(\d+) train_time:(\d+)ms saved (.+)$")
_REACHED_RE = re.compile(r"^target val_loss (\S+) reached at step:(\d+) train_time:(\d+)ms$")
_NOT_REACHED_RE = re.compile(r"^target val_loss (\S+) not reached: best val_loss (\S+) at step:(\d+)$")

# header keys whose value must not change if they are printed more than once
_CRITICAL_KEYS = ("target_val_loss", "val_tokens", "tokens_per_step")


def _parse_float(s: str) -> float:
    if not _FLOAT_RE.match(s):
        raise ValueError(f"not a number: {s!r}")
    return float(s)


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
        "step_avg_ms": step_avg,
        "extra": {k: v for k, v in fields.items() if k not in (f"{kind}_loss", "train_time", "step_avg")},
    }


def parse_log(text: str) -> dict:
    """Parse the text of a run log.

    Never raises on malformed content; problems are collected in `errors`
    (each a one-line description). Returned keys:
      source, code_sha256, computed_sha256, header (first value per key),
      header_conflicts, events (ordered list of step/resume/checkpoint/final
      records, each with `lineno`), steps, val, train, resumes, checkpoints,
      final (None or dict), final_lines (count of `target val_loss` lines),
      last_line, errors.
    """
    out: dict = {
        "source": None,
        "code_sha256": None,
        "computed_sha256": None,
        "header": {},
        "header_conflicts": {},
        "events": [],
        "steps": [],
        "val": [],
        "train": [],
        "resumes": [],
        "checkpoints": [],
        "final": None,
        "final_lines": 0,
        "last_line": None,
        "errors": [],
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

    header = out["header"]
    for lineno0 in range(body_start, len(lines)):
        lineno = lineno0 + 1
        line = lines[lineno0].rstrip("\r")
        if line.strip():
            out["last_line"] = (lineno, line)
        if line.startswith("step:"):
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
        m = _HEADER_RE.match(line)
        if m:
            key, value = m.group(1), m.group(2)
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


def _check(parsed: dict, target_override: float | None) -> tuple[str | None, dict]:
    """Return (reason or None, facts). facts holds what could be read."""
    facts: dict = {}
    header = parsed["header"]
    facts["val_tokens"] = header.get("val_tokens")
    facts["header_target"] = header_float(header, "target_val_loss")
    if parsed["val"]:
        last_val = parsed["val"][-1]
        facts["final_val_loss"] = last_val["loss"]
        facts["step"] = last_val["step"]
    final = parsed["final"]
    if final is not None and final.get("reached"):
        facts["train_time_ms"] = final["train_time_ms"]
        facts["step"] = final["step"]

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

    if final is None:
        if parsed["final_lines"] == 0:
            return "no final 'target val_loss ...' line (incomplete run?)", facts
        return "malformed final 'target val_loss ...' line", facts
    if parsed["final_lines"] != 1:
        return f"{parsed['final_lines']} 'target val_loss' lines, expected exactly 1", facts
    if parsed["last_line"] is None or parsed["last_line"][0] != final["lineno"]:
        return f"line {parsed['last_line'][0]}: output after the final 'target val_loss' line", facts
    if not final["reached"]:
        return (f"target not reached (best val_loss {final['best_val_loss_str']} "
                f"at step:{final['step']})"), facts

    header_target = facts["header_target"]
    if header_target is None:
        if "target_val_loss" in header:
            return f"unparseable target_val_loss header value {header['target_val_loss']!r}", facts
        if target_override is None:
            return "no 'target_val_loss:' header line (pass --target to supply one)", facts
    else:
        try:
            printed_target = _parse_float(final["target_str"])
        except ValueError:
            return f"unparseable target in final line: {final['target_str']!r}", facts
        decimals = len(final["target_str"].partition(".")[2])
        if round(header_target, decimals) != round(printed_target, decimals):
            return (f"final line target {final['target_str']} disagrees with header "
                    f"target_val_loss {header['target_val_loss']}"), facts
    target = target_override if target_override is not None else header_target
    facts["target"] = target

    if not parsed["val"]:
        return "no val lines", facts
    last_val = parsed["val"][-1]
    if last_val["step"] != final["step"]:
        return (f"final line names step:{final['step']} but the last val line "
                f"(line {last_val['lineno']}) is at step:{last_val['step']}"), facts
    if last_val["train_time_ms"] != final["train_time_ms"]:
        return (f"final line train_time {final['train_time_ms']}ms differs from the last val "
                f"line's {last_val['train_time_ms']}ms"), facts
    if not (last_val["loss"] <= target):
        return (f"last val_loss {last_val['loss_str']} at step:{last_val['step']} "
                f"is not <= target {target:g}"), facts
    return None, facts


def verify_log(path, target: float | None = None) -> dict:
    """Verify one log file. Never raises for bad input; see `ok` and `reason`.

    Returned keys: path, ok, reason, final_val_loss, train_time_ms, step,
    target, header_target, val_tokens, code_sha256, n_resumes.
    """
    path = Path(path)
    result = {
        "path": str(path),
        "ok": False,
        "reason": None,
        "final_val_loss": None,
        "train_time_ms": None,
        "step": None,
        "target": target,
        "header_target": None,
        "val_tokens": None,
        "code_sha256": None,
        "n_resumes": 0,
    }
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        result["reason"] = f"cannot read file ({e.strerror or e})"
        return result
    except UnicodeDecodeError as e:
        result["reason"] = f"not valid UTF-8 ({e.reason} at byte {e.start})"
        return result
    parsed = parse_log(text)
    reason, facts = _check(parsed, target)
    result.update(facts)
    result["code_sha256"] = parsed["code_sha256"]
    result["n_resumes"] = len(parsed["resumes"])
    result["reason"] = reason
    result["ok"] = reason is None
    return result


def summarize(results: list[dict], target: float | None = None) -> dict:
    """Statistics over verified results. p is None when it cannot be computed,
    with the reason in `p_reason`."""
    ok = [r for r in results if r["ok"]]
    losses = [r["final_val_loss"] for r in ok]
    times = [r["train_time_ms"] / 1000.0 for r in ok]
    n = len(ok)
    out = {"n": n, "n_total": len(results), "target": target,
           "loss_mean": None, "loss_std": None, "time_mean_s": None, "time_std_s": None,
           "p": None, "t": None, "p_reason": None}
    if n == 0:
        out["p_reason"] = "no verified logs"
        return out
    out["loss_mean"] = sum(losses) / n
    out["time_mean_s"] = sum(times) / n
    if n > 1:
        out["loss_std"] = math.sqrt(sum((x - out["loss_mean"]) ** 2 for x in losses) / (n - 1))
        out["time_std_s"] = math.sqrt(sum((x - out["time_mean_s"]) ** 2 for x in times) / (n - 1))
    if target is None:
        targets = {r["target"] for r in ok}
        if len(targets) != 1:
            out["p_reason"] = f"logs have different targets {sorted(targets)}; pass --target"
            return out
        target = targets.pop()
        out["target"] = target
    if n < 2:
        out["p_reason"] = "n=1, need at least 2 runs"
        return out
    if max(losses) == min(losses):
        out["p_reason"] = "zero variance in val losses"
        return out
    from scipy import stats

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Verify train_gpt.py run logs (embedded code hash, step lines, monotone "
                    "train_time, target reached) and test that the mean final val loss is "
                    "below the target.")
    ap.add_argument("logs", nargs="+", metavar="LOG", help="run log(s), e.g. logs/<run_id>.txt")
    ap.add_argument("--no-stats", action="store_true",
                    help="do not require p < 0.01 for exit code 0 (stats are still printed)")
    ap.add_argument("--target", type=float, default=None,
                    help="target val loss to check against (default: target_val_loss from each log's header)")
    args = ap.parse_args(argv)

    results = []
    for path in args.logs:
        r = verify_log(path, target=args.target)
        results.append(r)
        if r["ok"]:
            print(f"OK   {r['path']}: val_loss {r['final_val_loss']:.4f} at step:{r['step']} "
                  f"time {_fmt_time(r['train_time_ms'])}"
                  + (f" resumes {r['n_resumes']}" if r["n_resumes"] else ""))
        else:
            extra = ""
            if r["final_val_loss"] is not None:
                extra = f" [last val_loss {r['final_val_loss']:.4f}, time {_fmt_time(r['train_time_ms'])}]"
            print(f"FAIL {r['path']}: {r['reason']}{extra}")

    s = summarize(results, target=args.target)
    print(f"verified {s['n']}/{s['n_total']} logs")
    if s["n"]:
        loss_std = f"{s['loss_std']:.4f}" if s["loss_std"] is not None else "n/a"
        time_std = f"{s['time_std_s']:.2f}s" if s["time_std_s"] is not None else "n/a"
        print(f"val_loss: mean {s['loss_mean']:.4f} std {loss_std}")
        print(f"time:     mean {s['time_mean_s']:.2f}s std {time_std}")
    tgt = f"{s['target']:g}" if s["target"] is not None else "target"
    if s["p"] is not None:
        print(f"p-value (one-sided t-test, mean val_loss < {tgt}): {s['p']:.3g} (t={s['t']:.3f}, n={s['n']})")
    else:
        print(f"p-value (one-sided t-test, mean val_loss < {tgt}): n/a ({s['p_reason']})")

    all_ok = all(r["ok"] for r in results)
    stats_ok = args.no_stats or (s["p"] is not None and s["p"] < 0.01)
    if all_ok and not stats_ok:
        print("FAIL stats: p-value is not < 0.01 (use --no-stats to skip this requirement)")
    return 0 if (all_ok and stats_ok) else 1


if __name__ == "__main__":
    sys.exit(main())
