"""The trainer's data, model, loop and logging, on tiny CPU runs."""
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch._dynamo.testing

import train_gpt
from conftest import ROOT, make_char_data, read_metrics, run_log_text, tiny_args


# --- shards and the loader

def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 2, 65535, 7, 42], dtype=np.int64)
    path = str(tmp_path / "s.bin")
    train_gpt.write_shard(path, tokens)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert list(header[:3]) == [20240520, 1, len(tokens)]
    assert os.path.getsize(path) == 1024 + 2 * len(tokens)
    np.testing.assert_array_equal(np.asarray(train_gpt.read_shard(path)), tokens)


def _bad_header(path, magic=20240520, version=1, count=10, n_written=10):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, count
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.arange(n_written, dtype=np.uint16).tobytes())


@pytest.mark.parametrize("kind, expected", [
    ("magic", "wrong magic number"), ("version", "unsupported shard version"),
    ("short", "header claims 10 tokens but the file holds 4"), ("tiny", "shorter than the 1024-byte shard header")])
def test_bad_shards_are_refused(tmp_path, kind, expected):
    path = str(tmp_path / "bad.bin")
    if kind == "tiny":
        open(path, "wb").write(b"\0" * 10)
    else:
        _bad_header(path, magic=1 if kind == "magic" else 20240520, version=2 if kind == "version" else 1,
                    n_written=4 if kind == "short" else 10)
    with pytest.raises(train_gpt.UsageError, match=expected) as err:
        train_gpt.read_shard(path)
    assert path in str(err.value) and "\n" not in str(err.value)


def test_loader_ranks_are_disjoint_and_cover_the_global_batch(tmp_path):
    tokens = np.arange(5000) % 60000
    train_gpt.write_shard(str(tmp_path / "train_000000.bin"), tokens)
    pattern = str(tmp_path / "train_*.bin")
    B, T, K, W = 3, 8, 3, 2
    single = train_gpt.DistributedDataLoader(pattern, B * W, T, 0, 1, mtp_steps=K)
    ranks = [train_gpt.DistributedDataLoader(pattern, B, T, r, W, mtp_steps=K) for r in range(W)]
    for _ in range(4):
        x_all, y_all = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        xs = torch.cat([x for x, _ in parts])
        torch.testing.assert_close(xs, x_all)  # the ranks' slices make up the global batch, in rank order
        seen = [set(x.flatten().tolist()) for x, _ in parts]
        assert not seen[0] & seen[1]  # and never overlap (token ids here are distinct positions)
        for x, y in parts:
            assert y.shape == (K, B, T)
            for k in range(1, K + 1):  # offset-k targets are the inputs shifted by k
                torch.testing.assert_close(y[k - 1], x + k)


def test_loader_visits_every_window_once_per_pass_then_next_shard_and_wraps(tmp_path):
    for i in range(2):  # shard i holds 1000*i + position
        train_gpt.write_shard(str(tmp_path / f"train_{i:06d}.bin"), 1000 * i + np.arange(200))
    loader = train_gpt.DistributedDataLoader(str(tmp_path / "train_*.bin"), 2, 16, 0, 1, seed=3)
    starts = [loader.next_batch()[0][:, 0].tolist() for _ in range(18)]  # 12 windows of 16 per shard: 6 batches
    first_pass = [s for batch in starts[:6] for s in batch]
    assert sorted(first_pass) == list(range(0, 192, 16)) and first_pass != sorted(first_pass)  # all, shuffled
    assert sorted(s for batch in starts[6:12] for s in batch) == list(range(1000, 1192, 16))
    # the second pass over shard 0 starts its windows at another offset (7*16//11 = 10): no window repeats
    assert all(s % 16 == 10 and s < 1000 for batch in starts[12:17] for s in batch)  # 11 windows fit now
    again = train_gpt.DistributedDataLoader(str(tmp_path / "train_*.bin"), 2, 16, 0, 1, seed=3)
    assert [again.next_batch()[0][:, 0].tolist() for _ in range(6)] == starts[:6]  # the order is seeded


def test_val_set_is_the_same_for_any_world_size(char_data):
    meta = train_gpt.load_meta(os.path.join(char_data, "train_*.bin"))
    val = train_gpt.ValidationSet(os.path.join(char_data, "val_*.bin"), 3, 16, 10_000, meta["vocab_size"])
    one = torch.cat([x.flatten() for x, _, n in val.batches(0, 1)])
    two = [torch.cat([x.flatten() for x, _, n in val.batches(r, 2)]) for r in range(2)]
    assert sum(n for *_, n in val.batches(0, 1)) == val.n_tokens
    assert sorted(one.tolist()) == sorted(two[0].tolist() + two[1].tolist())


def test_a_screen_is_windows_spread_over_the_set_and_the_rest_completes_it(char_data):
    meta = train_gpt.load_meta(os.path.join(char_data, "train_*.bin"))
    val = train_gpt.ValidationSet(os.path.join(char_data, "val_*.bin"), 3, 16, 10_000, meta["vocab_size"], 2)
    screen, rest = val.screen_split(8)
    assert len(screen) == 8 and sorted([*screen, *rest]) == list(range(val.n_windows))
    assert max(np.diff(screen)) - min(np.diff(screen)) <= 1 and screen[-1] >= val.n_windows - val.n_windows // 8 - 1
    tokens = torch.from_numpy(np.asarray(val.tokens).astype(np.int64))
    x = torch.cat([x[:n // 16] for x, _, n in val.batches(0, 1, screen)])
    y = torch.cat([y[:, :n // 16] for _, y, n in val.batches(0, 1, screen)], dim=1)
    for row, j in enumerate(screen):
        assert torch.equal(x[row], tokens[j * 16:(j + 1) * 16])
        assert torch.equal(y[1, row], tokens[j * 16 + 2:(j + 1) * 16 + 2])  # the second MTP offset's targets


def test_a_screen_scores_the_mean_loss_of_its_windows_in_float64(tmp_path, char_data):
    args = tiny_args(char_data, str(tmp_path), val_screen_tokens=128, target_val_loss=1.0)
    trainer = train_gpt.Trainer(train_gpt.resolve_config(args))
    trainer.setup()
    screen = trainer.val_parts[0]
    sums = trainer.score(screen)
    model = trainer.raw_model.double().eval()
    tokens = torch.from_numpy(np.asarray(trainer.val_set.tokens).astype(np.int64))
    x = torch.stack([tokens[j * 16:(j + 1) * 16] for j in screen])
    y = torch.stack([tokens[j * 16 + 1:(j + 1) * 16 + 1] for j in screen])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x).reshape(-1, model(x).size(-1)), y.reshape(-1))
    assert trainer.screen_tokens == 128 == sums[-1].item()
    assert abs(sums[0].item() / 128 - expected.item()) < 1e-5


def test_a_screen_changes_no_outcome_and_skips_only_validations_far_above_the_target(tmp_path, char_data):
    """The same run with and without a screen: the same full val losses, the same target step; the screened
    validations are the ones whose screen scored above target + margin, and the last one is always full."""
    common = dict(max_iters=300, eval_interval=10, learning_rate=3e-3, target_val_loss=2.2)
    plain, screened = str(tmp_path / "plain"), str(tmp_path / "screened")
    a = train_gpt.main(tiny_args(char_data, plain, **common))
    b = train_gpt.main(tiny_args(char_data, screened, val_screen_tokens=128, val_screen_margin=0.3, **common))
    assert a["reached"] is not None and (a["reached"], a["train_time_ms"] > 0) == (b["reached"], True)
    full = {r["step"]: r["val_loss"] for r in read_metrics(plain) if "val_loss" in r}
    rows = [r for r in read_metrics(screened) if "val_loss" in r]
    skipped = [r for r in rows if "screen_tokens" in r]
    assert skipped and all(r["screen_tokens"] == 128 and r["val_loss"] > 2.5 for r in skipped)
    assert "screen_tokens" not in rows[-1] and rows[-1]["step"] == b["reached"]
    for r in rows:
        if "screen_tokens" not in r:
            assert abs(r["val_loss"] - full[r["step"]]) < 1e-5, (r, full[r["step"]])
    assert "step:0/300 val_loss:" in run_log_text(screened) and " screen_tokens:128\n" in run_log_text(screened)
    # no target, or a screen larger than half the val set: every validation is full
    for n, flags in enumerate([dict(val_screen_tokens=128, max_iters=10),
                               dict(val_screen_tokens=512, target_val_loss=0.1)]):
        logs = str(tmp_path / f"off{n}")
        train_gpt.main(tiny_args(char_data, logs, **flags))
        assert not [r for r in read_metrics(logs) if "screen_tokens" in r]
        assert "\nval_screen_tokens_evaluated: 0\n" in run_log_text(logs)


@pytest.mark.parametrize("dropout, graphs", [(0.0, 1), (0.3, 2)])
def test_validation_compiles_no_graph_of_its_own_without_dropout(tmp_path, char_data, monkeypatch, dropout, graphs):
    """Without dropout, validation runs the compiled training forward; with dropout, an eval-mode graph of its own.
    Either way the val loss is the uncompiled model's in eval mode, the same at every validation."""
    counter = torch._dynamo.testing.CompileCounter()
    compile_model = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_model(model, backend=counter))
    trainer = train_gpt.Trainer(train_gpt.resolve_config(tiny_args(char_data, str(tmp_path), dropout=dropout,
                                                                   compile=True)))
    trainer.setup()
    trainer.warm_up()
    sums = [trainer.score(None) for _ in range(2)]
    assert counter.frame_count == graphs and torch.equal(sums[0], sums[1])
    model, expected = trainer.raw_model.eval(), 0.0
    with torch.no_grad():
        for x, y, n_valid in trainer.val_set.batches(0, 1):
            expected += model(x, y)[1].item() * n_valid
    assert abs(sums[0][0].item() - expected) < 1e-5 * expected


# --- the model

def test_model_is_causal():
    torch.manual_seed(0)
    for pos_emb in ("rope", "learned"):
        cfg = train_gpt.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                  pos_emb=pos_emb, mtp_steps=2)
        model = train_gpt.GPT(cfg)
        for p in model.parameters():  # zero-initialised projections would hide a leak
            torch.nn.init.normal_(p, std=0.1)
        idx = torch.randint(0, 64, (2, 16))
        changed = idx.clone()
        changed[:, 10:] = (changed[:, 10:] + 1) % 64
        a, b = model(idx), model(changed)
        torch.testing.assert_close(a[:, :10], b[:, :10])
        assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_vocab_is_padded_to_a_multiple_of_64():
    assert train_gpt.padded_vocab(65) == 128 and train_gpt.padded_vocab(50257) == 50304
    assert train_gpt.padded_vocab(64) == 64


# --- configuration

def test_nanogpt_cpu_command_line_parses():
    argv = ("--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 "
            "--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0").split()
    cfg = train_gpt.resolve_config(argv)
    assert cfg.compile is False and cfg.val_tokens == 20 * 12 * 64 and cfg.lr_decay_iters == 2000
    assert cfg.block_size == 64
    cfg = train_gpt.resolve_config(["--preset", "gpt2_124m", "--gradient_accumulation_steps", "16", "--device", "cpu"])
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.grad_accum_steps) == (12, 768, 1024, 16)
    assert cfg.batch_size * cfg.block_size * 8 == 524_288  # the preset's own accumulation gives 0.5M tokens


@pytest.mark.parametrize("argv, world_size, message", [
    (["--n_embd", "130", "--n_head", "4"], 1, "--n_embd 130 is not divisible by --n_head 4"),
    (["--batch_size", "5"], 2, r"5 sequences .* cannot be shared evenly by 2 processes: run \[1, 5\] processes"),
    (["--n_kv_head", "3"], 1, "--n_kv_head 3 must divide n_head 4"),
    (["--learning_rate", "-1"], 1, "--learning_rate must be positive"),
    (["--adafactor_lr", "0"], 1, "--adafactor_lr must be positive"),
    (["--val_screen_tokens", "-64"], 1, "--val_screen_tokens -64 and --val_screen_margin 0.06 must be >= 0"),
    (["--half_batch_steps", "-1"], 1, "--half_batch_steps must be non-negative"),
    (["--half_batch_steps", "5", "--grad_accum_steps", "2"], 2, "--half_batch_steps 5 halves each process's "
     r"micro-batches, but each runs 1 a step .*: double --grad_accum_steps and halve --batch_size"),
])
def test_impossible_combinations_fail_with_one_line(argv, world_size, message):
    with pytest.raises(train_gpt.UsageError, match=message):
        train_gpt.resolve_config(argv, world_size=world_size)


def _run_cli(args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env=env)


def test_cli_errors_exit_2_with_one_line_and_no_log(tmp_path, char_data):
    logs = tmp_path / "logs"
    cases = [
        (["--bogus_flag=1"], "unknown flag --bogus_flag"),
        (["--preset", "nope"], "--preset: invalid choice"),
        (tiny_args(char_data, str(logs), input_bin=str(tmp_path / "none_*.bin")), "no training shards match"),
        (tiny_args(char_data, str(logs), n_embd=33), "not divisible by --n_head"),
    ]
    for args, message in cases:
        result = _run_cli(args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
    assert not logs.exists()


def test_bad_data_is_refused_before_training(tmp_path):
    data = str(tmp_path / "d")
    make_char_data(data)
    args = tiny_args(data, str(tmp_path / "logs"))
    cfg = train_gpt.resolve_config(args)
    with open(os.path.join(data, "meta.json"), "w") as f:  # a vocabulary too small for the shard's ids
        json.dump({"tokenizer": "char", "chars": "abc"}, f)
    with pytest.raises(train_gpt.UsageError, match="token id .* >= vocab_size 3"):
        train_gpt.Trainer(cfg)
    with open(os.path.join(data, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(train_gpt.UsageError, match="meta.json is not valid JSON"):
        train_gpt.Trainer(cfg)
    os.remove(os.path.join(data, "meta.json"))
    with pytest.raises(train_gpt.UsageError, match="meta.json is missing"):
        train_gpt.Trainer(cfg)
    make_char_data(data, text="abcdefgh" * 100, val_fraction=0.05)  # 40 val tokens < one 4x16 batch
    with pytest.raises(train_gpt.UsageError, match="fewer than one batch needs"):
        train_gpt.Trainer(train_gpt.resolve_config(args))


# --- training runs

def test_tiny_run_lowers_loss_writes_log_and_samples(tmp_path, char_data, capsys):
    logs = str(tmp_path / "logs")
    result = train_gpt.main(tiny_args(char_data, logs, max_iters=40, eval_interval=20, learning_rate=3e-3))
    rows = read_metrics(logs)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 0.5, val
    assert result["reached"] is None
    text = run_log_text(logs)
    source, rest = text.split("\n" + "=" * 100 + "\n", 1)
    assert source + "\n" == open(os.path.join(ROOT, "train_gpt.py")).read()
    assert rest.splitlines()[0] == "code_sha256:" + hashlib.sha256((source + "\n").encode()).hexdigest()
    assert "\nn_layer: 2\n" in rest and "\ntokens_per_step: 64\n" in rest
    assert "step:40/40 val_loss:" in rest and "step:1/40 train_loss:" in rest
    assert rest.rstrip().splitlines()[-1].startswith("target val_loss 0.0000 not reached: best val_loss")
    model_pt = os.path.join(logs, os.path.splitext([f for f in os.listdir(logs) if f.endswith(".txt")][0])[0],
                            "model.pt")
    capsys.readouterr()
    train_gpt.main(["--sample", model_pt, "--prompt", "the ", "--max_new_tokens", "30", "--top_k", "5"])
    out = capsys.readouterr().out
    assert out.startswith("the ") and len(out.splitlines()[0]) >= 20


def test_run_stops_when_target_is_reached(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    result = train_gpt.main(tiny_args(char_data, logs, max_iters=300, eval_interval=10, learning_rate=3e-3,
                                      target_val_loss=2.2))
    assert result["reached"] is not None and result["reached"] < 300
    last = run_log_text(logs).rstrip().splitlines()[-1]
    assert last.startswith(f"target val_loss 2.2000 reached at step:{result['reached']} train_time:")


@pytest.mark.parametrize("recipe, features", [
    ("speedrun", dict(n_kv_head=1, mtp_enabled=True, mtp_max_steps=3, mtp_rampup_steps=4,  # Muon, GQA, MTP,
                      grad_accum_steps=4, half_batch_steps=3)),  # one micro-batch a process, then two
    ("classic", dict(optimizer="adamsn"))])
def test_two_process_torchrun_matches_one_process(tmp_path, char_data, recipe, features):
    """2 Gloo processes with one micro-batch each (or two) == 1 process accumulating two micro-batches (or four)."""
    common = dict(max_iters=8, eval_interval=4, grad_accum_steps=2, dropout=0.0, timing_warmup_steps=0,
                  recipe=recipe, warmup_iters=2, warmdown_iters=2, target_val_loss=0.5, val_screen_tokens=128)
    common.update(features)  # a target too low to reach: validations before the last stop at their screen
    one = str(tmp_path / "one")
    train_gpt.main(tiny_args(char_data, one, **common))
    two = str(tmp_path / "two")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train_gpt.py"), *tiny_args(char_data, two, **common)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = read_metrics(one), read_metrics(two)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    assert [r["step"] for r in a if "screen_tokens" in r] == [0, 4]
    for ra, rb in zip(a, b):
        key = "val_loss" if "val_loss" in ra else "train_loss"
        assert abs(ra[key] - rb[key]) < 1e-5, (ra, rb)


def test_the_first_half_batch_steps_are_the_steps_of_half_the_batch(tmp_path, char_data):
    """With two micro-batches a step, the first half_batch_steps steps train as a run of one micro-batch a step:
    the same losses, and half the tokens counted."""
    common = dict(max_iters=4, eval_interval=0, timing_warmup_steps=0, warmup_iters=1, warmdown_iters=2)
    half, one = str(tmp_path / "half"), str(tmp_path / "one")
    train_gpt.main(tiny_args(char_data, half, grad_accum_steps=2, half_batch_steps=2, **common))
    train_gpt.main(tiny_args(char_data, one, grad_accum_steps=1, **common))
    a, b = ([r for r in read_metrics(logs) if "train_loss" in r] for logs in (half, one))
    assert [r["train_loss"] for r in a[:2]] == [r["train_loss"] for r in b[:2]]
    assert abs(a[2]["train_loss"] - b[2]["train_loss"]) > 1e-4  # then two micro-batches a step
    sequence = 16  # tiny_args' block_size; 4 sequences a micro-batch
    assert [r["tokens"] for r in a] == [4 * sequence, 8 * sequence, 16 * sequence, 24 * sequence]
    assert "the first 2 steps half of it" in run_log_text(half)


# --- short runs: a schedule the user did not give adapts, one the user gave is kept or refused

@pytest.mark.parametrize("flags, warmup, warmdown, note", [
    (["--recipe", "classic", "--max_iters", "50"], 25, 0, "warmup 100 + warmdown 0 steps do not fit in --max_iters 50, "
                                                          "so warmup 25 + warmdown 0"),
    (["--recipe", "classic", "--max_iters", "50", "--schedule", "wsd", "--warmdown_iters", "20"], 15, 20,
     "so warmup 15 + warmdown 20"),
    (["--recipe", "classic", "--max_iters", "500"], 100, 0, None),
    (["--recipe", "speedrun", "--max_iters", "3"], 0, 1, None)])
def test_a_schedule_not_given_fits_a_short_run_and_says_so(flags, warmup, warmdown, note):
    cfg = train_gpt.resolve_config(["--device", "cpu", "--run_id", "short", *flags])
    assert (cfg.warmup_iters, cfg.warmdown_iters) == (warmup, warmdown)
    notes = [n for n in cfg.notes if n.startswith("short-run: ")]
    assert (note in notes[0]) if note else not notes


def test_a_schedule_given_that_cannot_fit_is_refused():
    with pytest.raises(train_gpt.UsageError, match=r"--warmup_iters 60 \+ --warmdown_iters 0 must fit in "
                                                    r"--max_iters 50"):
        train_gpt.resolve_config(["--device", "cpu", "--recipe", "classic", "--max_iters", "50",
                                  "--warmup_iters", "60"])


def test_the_log_says_how_long_the_warm_up_took(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    train_gpt.main(tiny_args(char_data, logs, max_iters=2, warmdown_iters=1, eval_interval=0, recipe="classic",
                             max_data_passes=0))
    assert re.search(r"^short-run: warmup 100 \+ warmdown 1 steps do not fit in --max_iters 2, so warmup 0 \+ "
                     r"warmdown 1 .*$", run_log_text(logs), re.M)
    assert re.search(r"^warm-up: first steps \d+\.\d s, untimed$", run_log_text(logs), re.M)
