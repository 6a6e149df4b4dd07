#!/usr/bin/env python3
"""Submit a record: verify run logs against a track's rules, copy them into records/<track>/<date>_<Name>/ with a
README.md skeleton, and add the record's row to the record table in records/<track>/README.md, sorted by time.

    python records/submit.py --track shakespeare_char --name MyChange --description "what changed" logs/a.txt ...

A track is a folder of records/ with a README.md; its track table (data, target, val tokens, hardware) is the one
place the track's rules are defined. Two logs with the same losses, or a log whose run a record already holds, are
refused (verify.fingerprint); --description and --contributors are shown as text, their markdown escaped. Any
refusal is one line on stderr and exit code 2, and leaves no record folder behind.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import sys
import urllib.parse
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verify  # noqa: E402

TRACK_HEADER = ["train data", "val data", "target val loss", "val tokens", "hardware"]
TABLE_HEADER = "| time | description | date | log | contributors |"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_WHOLE_RE = re.compile(r"^whole split \(([\d,]+)\)$")
_CPU_CORES_RE = re.compile(r"^(\d+)-core CPU$")
_TIME_CELL_RE = re.compile(r"^([\d.]+)\s*(ms|s|min|h)\b")
# Markdown's characters that change a README's structure or formatting anywhere in a line, and at its start.
_MD_SPECIAL_RE = re.compile(r"([\\`*_\[\]()<>|~#&$!])")
_MD_LINE_START_RE = re.compile(r"^(\d*)([-+=]|(?<=\d)[.)])")
# Val windows cover the whole split when less than one context window (plus the few tokens held back as shifted
# targets) is left over.
VAL_SLACK_TOKENS = 8


class Refused(Exception):
    """One line saying why the submission is refused (exit code 2)."""


def _cells(line: str) -> list[str]:
    return [c.strip().strip("`").strip() for c in line.strip().strip("|").split("|")]


def read_track(readme: str, name: str) -> dict:
    """The fixed-rules table of records/<name>/README.md as train, val (shard globs as a path ending), target
    (float), val_tokens (('whole', split size) or ('exact', n) or None), cpu_cores (int or None)."""
    where = f"records/{name}/README.md"
    lines = readme.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and [c.lower() for c in _cells(line)] == TRACK_HEADER:
            break
    else:
        raise Refused(f"{where} has no track table (| {' | '.join(TRACK_HEADER)} |)")
    if i + 2 >= len(lines) or not lines[i + 2].startswith("|"):
        raise Refused(f"{where}: the track table has no row under its header")
    train, val, target, val_tokens, hardware = (_cells(lines[i + 2]) + [""] * 5)[:5]
    whole = _WHOLE_RE.match(val_tokens)
    if whole:
        tokens = ("whole", int(whole.group(1).replace(",", "")))
    elif re.fullmatch(r"[\d,]+", val_tokens):
        tokens = ("exact", int(val_tokens.replace(",", "")))
    else:
        tokens = None
    cores = _CPU_CORES_RE.match(hardware)
    try:
        target_value = float(target)
    except ValueError:
        raise Refused(f"{where}: the track table's target {target!r} is not a number") from None
    return dict(train=train, val=val, target=target_value, val_tokens=tokens,
                cpu_cores=int(cores.group(1)) if cores else None)


def track_names(records_dir: Path) -> list[str]:
    """The tracks: the folders of records_dir that hold a README.md."""
    return sorted(d.name for d in records_dir.iterdir() if (d / "README.md").is_file())


def _data_matches(value: str | None, pattern: str) -> bool:
    return value is not None and (value == pattern or value.endswith("/" + pattern))


def check_track(r: dict, name: str, track: dict) -> None:
    """Raises Refused if a verified log did not run under the track's fixed rules."""
    header, path = r["parsed"]["header"], r["path"]
    for key, pattern in (("input_bin", track["train"]), ("input_val_bin", track["val"])):
        if not _data_matches(header.get(key), pattern):
            raise Refused(f"{path}: {key} {header.get(key)} is not track {name}'s data (.../{pattern}); "
                          f"train on that data, or submit to the track this data belongs to")
    logged = r["header_target"]
    if logged not in (0, None) and abs(logged - track["target"]) > 1e-9:
        raise Refused(f"{path}: ran with target_val_loss {logged:g}, track {name}'s target is {track['target']:g} "
                      f"(run with --target_val_loss 0 to never stop early)")
    kind = track["val_tokens"]
    if kind is not None:
        evaluated = verify.header_int(header, "val_tokens_evaluated")
        block = verify.header_int(header, "block_size") or 0
        if kind[0] == "whole" and (evaluated is None or kind[1] - evaluated >= block + VAL_SLACK_TOKENS):
            raise Refused(f"{path}: validated on {evaluated} tokens, not the whole val split of {kind[1]:,} "
                          f"(raise --val_tokens to at least {kind[1]})")
        if kind[0] == "exact" and evaluated != kind[1]:
            raise Refused(f"{path}: validated on {evaluated} tokens, track {name} uses {kind[1]:,} (--val_tokens)")
    if track["cpu_cores"] is not None:
        devices = r["parsed"]["header_all"].get("device", [])
        cpu = verify.log_cpu(r["parsed"])
        if not devices or devices[-1] != "cpu" or cpu is None or cpu[1] != track["cpu_cores"]:
            raise Refused(f"{path}: track {name} runs on a {track['cpu_cores']}-core CPU with no GPU; this log's "
                          f"device is {devices[-1] if devices else 'unknown'}, its CPU line "
                          f"{header.get('cpu', 'missing')!r}")
    if r["budget"] != "fixed":
        raise Refused(f"{path}: stopped at the target at step:{r['step']} of max_iters {r['max_iters']}; a record "
                      "runs its whole budget (--target_val_loss 0)")


def md_text(text: str) -> str:
    """Text as markdown that shows it as typed, on one line: whitespace (newlines too) collapsed to single spaces,
    markup characters escaped with a backslash, so it cannot change a table or a README's structure."""
    return _MD_LINE_START_RE.sub(r"\1\\\2", _MD_SPECIAL_RE.sub(r"\\\1", " ".join(text.split())))


def _row_seconds(row: str):
    m = _TIME_CELL_RE.match(_cells(row)[0])
    if not m:
        return None
    scale = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0}[m.group(2)]
    return float(m.group(1)) * scale


def add_row(readme: str, track: str, row: str) -> str:
    """records/<track>/README.md with `row` added to its record table, sorted by time."""
    lines = readme.split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER)]
    if not starts:
        raise Refused(f"records/{track}/README.md has no record table ({TABLE_HEADER})")
    first = starts[0] + 2
    end = first
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    rows = [r for r in lines[first:end] if "(none yet)" not in r] + [row]
    timed = sorted((r for r in rows if _row_seconds(r) is not None), key=_row_seconds)
    rows = timed + [r for r in rows if _row_seconds(r) is None]
    return "\n".join(lines[:first] + rows + lines[end:])


def record_readme(track: str, spec: dict, name: str, description: str, folder: str, results: list,
                  summary: dict) -> str:
    parsed = results[0]["parsed"]
    first = parsed["header"]
    shas = sorted({r["code_sha256"] for r in results})
    budget = sorted({r["max_iters"] for r in results})
    versions = ", ".join(f"{name} {version}" for name, version in (parsed["versions"] or {}).items())
    lines = [
        f"# {track}: {md_text(name)}, {summary['time_mean_s']:.1f} s mean train time over {summary['n']} runs",
        "",
        description,
        "",
        "(What changed against the previous record, why it is faster, and what else was tried.)",
        "",
        "| | |",
        "|---|---|",
        f"| track | `{track}`: target val loss {spec['target']:g}, data `{spec['train']}`, `{spec['val']}` |",
        f"| runs | {summary['n']}, each its whole budget of max_iters {', '.join(map(str, budget))} steps |",
        f"| mean train time | {summary['time_mean_s']:.2f} s (std {summary['time_std_s']:.2f} s) |",
        f"| mean final val loss | {summary['loss_mean']:.4f} (std {summary['loss_std']:.4f}) |",
        f"| one-sided t-test, mean < {spec['target']:g} | t = {summary['t']:.3f}, p = {summary['p']:.3g} |",
        f"| hardware | {md_text(first['cpu']) if first.get('cpu') else '(see the logs)'} |",
        f"| versions | {md_text(versions) if versions else '(see the logs)'} |",
        f"| code_sha256 | {', '.join(shas)} |",
        "",
        "| log | max_iters | train time | final val loss |",
        "|---|---|---|---|",
    ]
    for r in results:
        log = Path(r["path"]).name
        lines.append(f"| [{md_text(log)}]({urllib.parse.quote(log)}) | {r['max_iters']} | "
                     f"{r['train_time_ms'] / 1000:.2f} s | {r['final_val_loss']:.4f} |")
    hint = verify.data_hint(spec["train"])
    lines += [
        "",
        "## Verify and reproduce",
        "",
        "```bash",
        *([hint.split(" (")[0]] if hint else []),
        f"python records/verify.py --target {spec['target']:g} {folder}/*.txt",
        f"python records/verify.py --target {spec['target']:g} --reproduce {max(budget)} {folder}/*.txt",
        "```",
        "",
        ("The first command makes the track's data; the last re-runs every log from its embedded source and header "
         "configuration and compares each logged loss (records/README.md, Reproducing a run)."
         if hint else "The last command re-runs every log from its embedded source and header configuration (on "
         "the data its header names) and compares each logged loss (records/README.md, Reproducing a run)."),
        "",
    ]
    return "\n".join(lines)


def load_track(records_dir: Path, track: str) -> tuple[Path, str, dict]:
    """The track's README path, its text and its rules (read_track)."""
    if not records_dir.is_dir():
        raise Refused(f"--records_dir {records_dir}: no such folder; pass the records folder")
    tracks = track_names(records_dir)
    if track not in tracks:
        raise Refused(f"unknown track {track!r}; the tracks in {records_dir} are {', '.join(tracks)}")
    readme_path = records_dir / track / "README.md"
    try:
        readme = readme_path.read_text(encoding="utf-8")
    except OSError as e:
        raise Refused(f"{readme_path}: cannot read ({e.strerror or e})") from None
    return readme_path, readme, read_track(readme, track)


def refuse_copies(results: list, records_dir: Path) -> None:
    """Refused where two logs print the same losses (one run under two names), or where a log under records_dir
    (any track, any file name) already holds a log's run (see verify.fingerprint)."""
    held = verify.runs_held(verify.logs_under(records_dir))
    earlier = {}
    for r in results:
        key = verify.fingerprint(r["parsed"])
        if key in earlier:
            raise Refused(f"{r['path']}: the same losses as {earlier[key]}: a copy of one run under another name; "
                          f"{verify.ONE_SEED_EACH}")
        other = held.get(key, [None])[0]
        if other is not None:
            raise Refused(f"{r['path']}: the same losses as {other}: a record already holds this run; "
                          f"{verify.ONE_SEED_EACH}")
        earlier[key] = r["path"]


def verified_runs(logs: list, track: str, spec: dict, records_dir: Path) -> tuple[list, dict]:
    """Each log verified against the track's rules, none a copy of another or of a record's, and the statistics of
    them all; Refused unless p < 0.01."""
    names = [Path(p).name for p in logs]
    if len(set(names)) != len(names):
        raise Refused("two logs have the same file name; a record folder holds each log under its own name")
    for p in logs:
        if not Path(p).is_file():
            raise Refused(f"{p}: no such file; pass run logs such as logs/<run_id>.txt")
    results = []
    for p in logs:
        r = verify.verify_log(p, target=spec["target"])
        if not r["ok"]:
            raise Refused(f"{p}: fails verification: {r['reason']}")
        if not r["metrics"]:
            raise Refused(f"{p}: no <run_id>/metrics.jsonl beside it, so its printed numbers cannot be checked; "
                          "submit the log from the folder its run wrote it to")
        check_track(r, track, spec)
        results.append(r)
    refuse_copies(results, records_dir)
    summary = verify.summarize(results, target=spec["target"])
    if summary["p"] is None or summary["p"] >= verify.P_MAX:
        why = f"p = {summary['p']:.3g}" if summary["p"] is not None else summary["p_reason"]
        raise Refused(f"the mean final val loss {summary['loss_mean']:.4f} of {summary['n']} runs is not below the "
                      f"target {spec['target']:g} at p < {verify.P_MAX} ({why}); add runs or lower the loss")
    return results, summary


def write_record(final_dir: Path, results: list, record_text: str, readme_path: Path, new_readme: str) -> None:
    """The record folder and the track README's new text, both whole or neither: the folder is written under a
    temporary name and renamed when complete, and removed again if the README cannot be replaced."""
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp{os.getpid()}")
    tmp_readme = readme_path.with_name(f".README.md.tmp{os.getpid()}")
    try:
        tmp_dir.mkdir()
        for r in results:
            src = Path(r["path"])
            shutil.copy2(src, tmp_dir / src.name)
            if r["metrics"]:
                (tmp_dir / src.stem).mkdir()
                shutil.copy2(r["metrics"], tmp_dir / src.stem / "metrics.jsonl")
        (tmp_dir / "README.md").write_text(record_text, encoding="utf-8")
        tmp_readme.write_text(new_readme, encoding="utf-8")
        os.rename(tmp_dir, final_dir)
        try:
            os.replace(tmp_readme, readme_path)
        except OSError:
            shutil.rmtree(final_dir, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if tmp_readme.exists():
            tmp_readme.unlink()


def submit(args) -> str:
    records_dir = Path(args.records_dir)
    readme_path, readme, spec = load_track(records_dir, args.track)
    if not _NAME_RE.match(args.name):
        raise Refused(f"--name {args.name!r}: use letters, digits, '_' and '-' (e.g. MuonWarmup)")
    for flag, text in (("--description", args.description), ("--contributors", args.contributors)):
        if not text.split():
            raise Refused(f"{flag} is empty; give one line of text for the record table")
    date = datetime.date.today().isoformat()
    folder_name = f"{date}_{args.name}"
    final_dir = records_dir / args.track / folder_name
    if final_dir.exists():
        raise Refused(f"{final_dir} already exists; choose another --name")
    results, summary = verified_runs(args.logs, args.track, spec, records_dir)

    shown = f"{records_dir.resolve().name}/{args.track}/{folder_name}"  # as run from the folder above records/
    description, contributors = md_text(args.description), md_text(args.contributors)
    row = (f"| {summary['time_mean_s']:.1f} s (mean of {summary['n']}) | {description} | {date} | "
           f"[logs]({folder_name}) | {contributors} |")
    record_text = record_readme(args.track, spec, args.name, description, shown, results, summary)
    write_record(final_dir, results, record_text, readme_path, add_row(readme, args.track, row))
    return (f"submitted {final_dir}: {summary['n']} runs, mean train time {summary['time_mean_s']:.1f} s, mean final "
            f"val loss {summary['loss_mean']:.4f}, p = {summary['p']:.3g}; row added to {readme_path}")


def main(argv=None) -> int:
    ap = verify.OneLineParser(description="Verify run logs against a track's rules and add them as a record.")
    ap.add_argument("logs", nargs="+", metavar="LOG", help="run logs (logs/<run_id>.txt), each its whole budget")
    ap.add_argument("--track", required=True, help="track name: a folder of records/ with a README.md")
    ap.add_argument("--name", required=True, help="short name of the record, e.g. MuonWarmup")
    ap.add_argument("--description", default="(describe the change)",
                    help="one line for the record table, shown as text (whitespace collapsed, markdown escaped)")
    ap.add_argument("--contributors", default="(unknown)",
                    help="who made it, for the record table, shown as text like --description")
    ap.add_argument("--records_dir", default=str(Path(__file__).resolve().parent),
                    help="the records folder holding the tracks' folders (default: this script's folder, records/)")
    args = ap.parse_args(argv)
    try:
        print(submit(args))
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(verify.train_gpt.run_cli(main))  # a closed stdout (`| head`): exit code 1, quietly
