"""bench/benchmark.py end to end on tiny data and a tiny model: tables, parsed numbers, failures, usage errors."""
import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT, make_char_data

BENCH = os.path.join(ROOT, "bench", "benchmark.py")
TINY = "--n_layer 1 --n_embd 32 --n_head 2 --block_size 16 --batch_size 4 --eval_interval 4 --timing_warmup_steps 0"


def run_bench(tmp_path, *args, data=True, extra=TINY):
    if data:
        make_char_data(str(tmp_path / "data"))
    return subprocess.run([sys.executable, BENCH, "--data", str(tmp_path / "data"), "--log_dir", str(tmp_path / "logs"),
                           "--extra", extra, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)


def load_bench():
    spec = importlib.util.spec_from_file_location("benchmark", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def table(markdown, heading):
    """(headers, rows) of the first table after the line that starts with `heading`; cells are stripped strings."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    body = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            body.append([cell.strip() for cell in line.strip("|").split("|")])
        elif body:
            break
    return body[0], body[2:]


def test_recipes_table_has_a_row_per_config_with_numbers_from_the_metrics(tmp_path):
    proc = run_bench(tmp_path, "--suite", "recipes", "--steps", "8", "--speedrun_steps", "8", "--seeds", "1",
                     "--only", "classic", "speedrun")
    assert proc.returncode == 0, proc.stderr
    assert "[1/2] classic seed 1 ... elapsed" in proc.stdout and "[2/2] speedrun seed 1 ... elapsed" in proc.stdout
    headers, rows = table((tmp_path / "logs" / "results.md").read_text(), "## recipes: classic vs speedrun")
    assert [row[0] for row in rows] == ["classic", "speedrun"]
    runs = json.loads((tmp_path / "logs" / "results.json").read_text())
    assert [r["run_id"] for r in runs] == ["recipes_classic_1", "recipes_speedrun_1"]
    for row, run in zip(rows, runs):
        with open(tmp_path / "logs" / run["run_id"] / "metrics.jsonl") as f:
            last_val = [r for r in map(json.loads, f) if "val_loss" in r][-1]["val_loss"]
        assert run["final_val_loss"] == last_val
        assert row[headers.index("final val loss")] == f"{last_val:.4f}"
        assert run["params"] > 0 and run["tokens_per_step"] == 4 * 16 and run["state_bytes"] > 0
    assert "machine: " in (tmp_path / "logs" / "results.md").read_text()


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path):
    # with --n_head 2 the GQA config keeps every key/value head, which --embd_scale refuses
    proc = run_bench(tmp_path, "--suite", "features", "--steps", "4", "--only", "gqa2_scaled", "mha")
    assert proc.returncode == 1, proc.stderr
    markdown = (tmp_path / "logs" / "results.md").read_text()
    headers, rows = table(markdown, "## features")
    assert [row[0] for row in rows] == ["mha", "gqa2_scaled"]
    assert rows[0][headers.index("runs ok")] == "1/1" and rows[1][headers.index("runs ok")] == "0/1"
    assert rows[1][headers.index("final val loss")] == "n/a"
    assert "`features_gqa2_scaled_1337` failed: exit 2: error: --embd_scale" in markdown


def test_missing_data_and_unknown_names_exit_2(tmp_path):
    proc = run_bench(tmp_path, "--suite", "features", data=False)
    assert proc.returncode == 2 and "python data/shakespeare.py --source tinyshakespeare" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_bench(tmp_path, "--suite", "optimizers", "--only", "sgd", data=False)
    assert proc.returncode == 2 and "choose from adamw" in proc.stderr


def test_markdown_table_formats_and_aligns():
    bench = load_bench()
    text = bench.markdown_table([dict(name="a", x=1.23456, n=1234567), dict(name="b|c", x=None, n=2)],
                                [("name", "name", ""), ("x", "x", ".2f"), ("n", "n", ",")])
    assert text.splitlines() == ["| name |    x |         n |",
                                 "|:-----|-----:|----------:|",
                                 "| a    | 1.23 | 1,234,567 |",
                                 "| b\\|c |  n/a |         2 |"]


def test_optimizers_sweep_picks_the_best_rate_and_reuses_the_run_it_already_made(tmp_path):
    proc = run_bench(tmp_path, "--suite", "optimizers", "--steps", "4", "--only", "adamw", "adafactor",
                     "--seeds", "1337")
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((tmp_path / "logs" / "results.json").read_text())
    # 3 + 3 sweep runs at seed 1337 and 4 steps; the finals (same seed, same length) are those runs, not new ones
    assert len(runs) == 6 and all(r["run_id"].startswith("optimizers_sweep_") for r in runs)
    markdown = (tmp_path / "logs" / "results.md").read_text()
    headers, sweep = table(markdown, "## optimizers: learning-rate sweep")
    headers_final, finals = table(markdown, "## optimizers: 4 steps at the best rate")
    for opt in ("adamw", "adafactor"):
        rows = [r for r in sweep if r[0] == opt]
        chosen = min(rows, key=lambda r: float(r[headers.index("final val loss")]))
        assert chosen[headers.index("chosen")] == "yes"
        final = next(r for r in finals if r[0] == opt)
        assert final[headers_final.index("final val loss")] == chosen[headers.index("final val loss")]
    adafactor_flags = [r[headers.index("flags")] for r in sweep if r[0] == "adafactor"]
    assert all("--adafactor_lr" in f and "--learning_rate" in f for f in adafactor_flags)


def test_every_ablation_row_is_a_configuration_train_gpt_accepts():
    """Each row as the benchmark builds it (ablation_configs) on the speedrun settings of the BPE and char presets:
    a typo in a row would otherwise surface only when a benchmark reaches it, an hour in."""
    bench = load_bench()
    import train_gpt
    for preset in ("shakespeare_char", "shakespeare_gpt2"):
        args = SimpleNamespace(settings=bench.speedrun_settings(preset), speedrun_steps=0,
                               only=list(bench.ABLATIONS) + list(bench.SETTING_ABLATIONS))
        configs = bench.ablation_configs(args)
        assert len(configs) == len(args.only)
        for name, flags, _, steps in configs:
            cfg = train_gpt.resolve_config(["--preset", preset, "--device", "cpu", "--run_id", "ablation", *flags,
                                            "--max_iters", str(steps)])
            assert cfg.recipe == "speedrun", name


def test_speedrun_settings_become_flags_and_the_speedrun_runs_on_its_own_budget(tmp_path):
    bench = load_bench()
    flags = bench.settings_flags(dict(batch_size=48, max_iters=160, compile=True, learning_rate=6e-3, muon_lr=0.05))
    assert flags == ["--batch_size", "48", "--compile", "True", "--learning_rate", "0.006", "--muon_lr", "0.05"]
    # every setting is a train_gpt.py flag
    import train_gpt
    cfg = train_gpt.resolve_config(["--preset", "shakespeare_char", "--device", "cpu",
                                    *bench.settings_flags(bench.speedrun_settings("shakespeare_char"))])
    for key, value in bench.speedrun_settings("shakespeare_char").items():
        if key != "max_iters":
            assert getattr(cfg, key) == value
    proc = run_bench(tmp_path, "--suite", "recipes", "--steps", "6", "--speedrun_steps", "4", "--seeds", "1", "2",
                     extra=TINY + " --compile False")
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((tmp_path / "logs" / "results.json").read_text())
    assert [r["run_id"] for r in runs] == ["recipes_classic_1", "recipes_speedrun_1", "recipes_classic_2",
                                           "recipes_speedrun_2"]
    for run in runs:
        argv = run["argv"]
        budget = int(argv[argv.index("--max_iters") + 1])
        assert budget == (6 if run["recipe"] == "classic" else 4)
        assert ("--muon_lr" in argv) == (run["recipe"] == "speedrun")
    markdown = (tmp_path / "logs" / "results.md").read_text()
    headers, rows = table(markdown, "## recipes: median over seeds")
    assert [r[0] for r in rows] == ["classic", "speedrun"]
    assert "speedrun / classic median time to target:" in markdown
    # records/plot.py draws the recipes' logs, one colour per recipe
    logs = [str(tmp_path / "logs" / f"{r['run_id']}.txt") for r in runs]
    plot = os.path.join(ROOT, "records", "plot.py")
    out = tmp_path / "recipes.png"
    proc = subprocess.run([sys.executable, plot, *logs, "-o", str(out), "--group_by", "recipe", "--title", "t"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run([sys.executable, plot, *logs, "-o", str(out), "--group_by", "no_such_key"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no 'no_such_key:' header line" in proc.stderr


def test_ablations_run_every_seed_and_setting_rows_keep_the_tokens(tmp_path):
    proc = run_bench(tmp_path, "--suite", "recipes", "--steps", "4", "--speedrun_steps", "4", "--seeds", "1", "2",
                     "--ablate", "--only", "speedrun", "no_softcap", "preset_batch", extra=TINY + " --compile False")
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((tmp_path / "logs" / "results.json").read_text())
    names = [r["run_id"] for r in runs]
    assert names == ["recipes_speedrun_1", "recipes_speedrun_2", "recipes_ablate_no_softcap_1",
                     "recipes_ablate_preset_batch_1", "recipes_ablate_no_softcap_2", "recipes_ablate_preset_batch_2"]
    bench = load_bench()
    preset = next(r for r in runs if "preset_batch" in r["run_id"])["argv"]
    ratio = bench.speedrun_settings("shakespeare_char")["batch_size"] // 12
    assert preset[preset.index("--max_iters") + 1] == str(4 * ratio)
    assert preset[preset.index("--batch_size") + 1] == "12"  # before --extra's tiny batch
    headers, rows = table((tmp_path / "logs" / "results.md").read_text(), "## recipes: speedrun ablations")
    assert [r[0] for r in rows] == ["speedrun (full)", "no_softcap", "preset_batch"]
    assert all(r[headers.index("times (s)")].count(" ") == 1 for r in rows)  # one time (or -) per seed


def test_median_counts_a_missed_target_as_slowest():
    bench = load_bench()
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([3.0, None, 1.0]) == 3.0
    assert bench.median([None, None, 1.0]) is None
    assert bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert bench.median([]) is None


def test_the_bpe_track_runs_its_own_preset_data_target_and_speedrun_settings(tmp_path):
    """--preset shakespeare_gpt2: the track's data folder and target by default, the speedrun's settings from that
    preset's recipes entry, and every run started from that preset."""
    bench = load_bench()
    args = bench.resolve_args(bench.build_parser(), ["--suite", "recipes", "--preset", "shakespeare_gpt2"])
    import train_gpt
    preset = train_gpt.PRESETS["shakespeare_gpt2"]
    assert args.data == os.path.join(ROOT, "data", "shakespeare_gpt2") and args.target == preset["target_val_loss"]
    assert args.settings == {"batch_size": preset["batch_size"], **preset["recipes"]["speedrun"]}
    proc = run_bench(tmp_path, "--suite", "recipes", "--preset", "shakespeare_gpt2", "--steps", "2",
                     "--speedrun_steps", "2", "--seeds", "1", "--only", "classic", extra=TINY + " --compile False")
    assert proc.returncode == 0, proc.stderr
    argv = json.loads((tmp_path / "logs" / "results.json").read_text())[0]["argv"]
    assert argv[argv.index("--preset") + 1] == "shakespeare_gpt2"
    assert argv[argv.index("--target_val_loss") + 1] == f"{preset['target_val_loss']:g}"
