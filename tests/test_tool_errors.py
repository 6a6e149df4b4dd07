"""The scripts in bench/, data/ and records/plot.py answer bad input with one line on stderr naming it, exit code 2
and no traceback, leave no unfinished output, and stop quietly when the reader of their stdout goes away."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, make_char_data, needs_gpt2_files, tiny_args

TINY_RUN = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "4",
            "--compile", "False"]
LONG_NAME = "x" * 300  # longer than any file system allows a file name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Paths the cases below name: good and damaged data, a plain file, a tiny trained model and its log, and a
    FineWeb folder that already holds its val shard (so cached_fineweb10B.py 0 downloads nothing)."""
    import train_gpt
    tmp = tmp_path_factory.mktemp("inputs")
    make_char_data(str(tmp / "data"))
    make_char_data(str(tmp / "no_meta"))
    os.remove(tmp / "no_meta" / "meta.json")
    make_char_data(str(tmp / "bad_meta"))
    (tmp / "bad_meta" / "meta.json").write_text('{"tokenizer": "char"')
    (tmp / "file").write_text("not a folder\n")
    flags = tiny_args(str(tmp / "data"), str(tmp / "logs"), max_iters=2, warmdown_iters=1, eval_interval=0,
                      compile=False, run_id="tiny")
    subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py"), *flags], check=True, capture_output=True)
    os.makedirs(tmp / "fineweb")
    train_gpt.write_shard(str(tmp / "fineweb" / "fineweb_val_000000.bin"), [1, 2, 3])
    return dict(data=tmp / "data", no_meta=tmp / "no_meta", bad_meta=tmp / "bad_meta", file=tmp / "file",
                model=tmp / "logs" / "tiny" / "model.pt", log=tmp / "logs" / "tiny.txt", fineweb=tmp / "fineweb")


def command(script, args, inputs, tmp_path):
    """The script's command line, {name} in args replaced by that input's path ({tmp}: tmp_path, {long}: LONG_NAME)."""
    paths = {k: str(v) for k, v in inputs.items()} | {"tmp": str(tmp_path), "long": LONG_NAME}
    return [sys.executable, os.path.join(ROOT, script), *(a.format(**paths) for a in args)]


BENCH = ["--suite", "features", "--steps", "1", "--only", "mha", "--log_dir", "{tmp}/logs"]
# (script, its arguments, what the error line must name)
BAD_INPUTS = {
    "benchmark_unknown_suite": ("bench/benchmark.py", ["--suite", "nope"], "--suite"),
    "benchmark_unclosed_quote_in_extra": ("bench/benchmark.py", [*BENCH, "--data", "{data}", "--extra", '"x'],
                                          "--extra"),
    "benchmark_unknown_flag_in_extra": ("bench/benchmark.py", [*BENCH, "--data", "{data}", "--extra", "--bogus 3"],
                                        "--bogus"),
    "benchmark_negative_seed": ("bench/benchmark.py", [*BENCH, "--data", "{data}", "--seeds", "-1"], "--seeds"),
    "benchmark_nan_target": ("bench/benchmark.py", ["--suite", "recipes", "--steps", "1", "--only", "classic",
                                                    "--log_dir", "{tmp}/logs", "--data", "{data}", "--target", "nan"],
                             "--target"),
    "benchmark_out_is_a_folder": ("bench/benchmark.py", [*BENCH, "--data", "{data}", "--out", "{tmp}"], "--out"),
    "benchmark_log_dir_is_a_file": ("bench/benchmark.py", [*BENCH[:-2], "--data", "{data}", "--log_dir", "{file}"],
                                    "--log_dir"),
    "benchmark_data_without_meta": ("bench/benchmark.py", [*BENCH, "--data", "{no_meta}"], "meta.json"),
    "compile_cost_zero_rounds": ("bench/compile_cost.py", ["--rounds", "0"], "--rounds"),
    "gpt2_124m_cpu_zero_steps": ("bench/gpt2_124m_cpu.py", ["--steps", "0"], "--steps"),
    "gpt2_124m_cpu_bad_mtp_steps": ("bench/gpt2_124m_cpu.py", ["--mtp_steps", "0"], "--mtp_steps"),
    "gpu_check_nan_budget": ("bench/gpu_check.py", ["--device", "cpu", "--only", "machine", "--budget_s", "nan",
                                                    "--out", "{tmp}/report"], "--budget_s"),
    "gpu_check_huge_steps": ("bench/gpu_check.py", ["--device", "cpu", "--only", "machine", "--steps", "10" * 8,
                                                    "--out", "{tmp}/report"], "--steps"),
    "gpu_check_out_is_a_file": ("bench/gpu_check.py", ["--device", "cpu", "--only", "machine", "--out", "{file}"],
                                "--out"),
    "newcomer_wait_zero_runs": ("bench/newcomer_wait.py", ["--runs", "0"], "--runs"),
    "newcomer_wait_unknown_commit": ("bench/newcomer_wait.py", ["--commit", "no_such_rev", "--keep", "{tmp}/keep"],
                                     "--commit"),
    "profile_step_zero_steps": ("bench/profile_step.py", ["--steps", "0", "--", "--input_bin", "{data}/train_*.bin",
                                                          "--input_val_bin", "{data}/val_*.bin", *TINY_RUN], "--steps"),
    "profile_step_unknown_sort": ("bench/profile_step.py", ["--steps", "1", "--sort", "nope", "--", "--input_bin",
                                                            "{data}/train_*.bin", "--input_val_bin",
                                                            "{data}/val_*.bin", *TINY_RUN], "--sort"),
    "same_losses_unknown_revision": ("bench/same_losses.py", ["no_such_rev", "--data", "{data}"], "no_such_rev"),
    "same_losses_damaged_meta": ("bench/same_losses.py", ["HEAD", "--data", "{bad_meta}"], "meta.json"),
    "val_spread_split_too_small_for_val_tokens": ("bench/val_spread.py", ["--model", "{model}", "--data", "{data}",
                                                                          "--val_tokens", "17"], "--val_tokens"),
    "plot_nan_target": ("records/plot.py", ["{log}", "-o", "{tmp}/curves.png", "--target", "nan"], "--target"),
    "plot_output_name_too_long": ("records/plot.py", ["{log}", "-o", "{tmp}/{long}.png"], "-o"),
    "shakespeare_out_dir_inside_a_file": ("data/shakespeare.py", ["--source", "tinyshakespeare", "--input", "{file}",
                                                                  "--out_dir", "{file}/out"], "--out_dir"),
    "fineweb_too_many_workers": ("data/fineweb.py", ["--input", "{file}", "--out_dir", "{tmp}/out", "--workers",
                                                     "100000"], "--workers"),
    "fineweb_out_dir_inside_a_file": ("data/fineweb.py", ["--input", "{tmp}/doc.txt", "--out_dir", "{file}/out"],
                                      "--out_dir"),
    "cached_fineweb_out_dir_is_a_file": ("data/cached_fineweb10B.py", ["0", "--out_dir", "{file}"], "--out_dir"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(case, inputs, tmp_path):
    script, args, named = BAD_INPUTS[case]
    (tmp_path / "doc.txt").write_text("to be or not to be\n")
    proc = subprocess.run(command(script, args, inputs, tmp_path), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert re.search(rf"(^|[\s'(/]){re.escape(named)}\b", lines[0]), f"{named} is not named in: {lines[0]}"


CLOSED_STDOUT = {
    "benchmark": ("bench/benchmark.py", [*BENCH, "--data", "{data}"]),
    "val_spread": ("bench/val_spread.py", ["--model", "{model}", "--data", "{data}"]),
    "plot": ("records/plot.py", ["{log}", "-o", "{tmp}/curves.png"]),
    "verify": ("records/verify.py", ["--no-stats", "{log}"]),
    "cached_fineweb": ("data/cached_fineweb10B.py", ["0", "--out_dir", "{fineweb}"]),
}


@pytest.mark.parametrize("case", CLOSED_STDOUT)
def test_a_closed_stdout_ends_the_script_quietly(case, inputs, tmp_path):
    script, args = CLOSED_STDOUT[case]
    proc = subprocess.Popen(command(script, args, inputs, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    proc.stdout.close()  # as `| head -1` does once it has its line; the script has printed nothing yet
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and stderr == "", stderr


@needs_gpt2_files
def test_a_tokenization_that_fails_leaves_no_shards_and_no_old_meta(tmp_path):
    out = tmp_path / "out"
    make_char_data(str(out))  # an earlier data set: its shards and meta.json
    docs = tmp_path / "docs.jsonl"
    with open(docs, "w") as f:
        f.writelines(json.dumps({"text": f"document {i} of the corpus"}) + "\n" for i in range(600))
        f.write('{"text": broken\n')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data", "fineweb.py"), "--input", str(docs),
                           "--out_dir", str(out), "--overwrite", "--shard_size", "100", "--workers", "1",
                           "--no_progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{docs}:601:" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(out) == []
