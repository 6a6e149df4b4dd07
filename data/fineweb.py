"""
data/fineweb.py: local text files as GPT-2 token shards for train_gpt.py.

Usage:
    python data/fineweb.py --input corpus.jsonl --out_dir data/mycorpus
    python data/fineweb.py --input books/*.txt --out_dir data/books --shard_size 10000000 --workers 8
    python data/fineweb.py --input dump.jsonl --field content --out_dir data/dump --overwrite
    python train_gpt.py --input_bin "data/mycorpus/train_*.bin" --input_val_bin "data/mycorpus/val_*.bin" ...

Inputs: a .txt file is one document (the whole file); a .jsonl file holds one JSON object per line, the document
being the string under --field ("text" by default); blank lines are skipped. Files are read as UTF-8 in the order
given, each .jsonl file line by line.

Tokens: each document is encoded with GPT-2's tokenizer (tiktoken, encode_ordinary: "<|endoftext|>" inside a
document is plain text) and prefixed with the <|endoftext|> token 50256, the document separator of GPT-2's training
data, so the stream reads 50256, doc 1, 50256, doc 2, ... Documents are encoded in parallel by --workers processes
and their tokens kept in input order.

Shards: the stream is cut every --shard_size tokens (documents run on across a cut). The first shard is the
validation split, OUT_DIR/val_000000.bin; the following ones are OUT_DIR/train_000001.bin, train_000002.bin, ...;
the last one holds what is left. So the val split is the first --shard_size tokens: pick --shard_size so that the
input holds several shards (an input smaller than one shard gives a val shard and no train shard, with a warning).
Also writes OUT_DIR/meta.json ({"tokenizer": "gpt2", "vocab_size": 50257}). An OUT_DIR that already holds shards
is refused unless --overwrite, which deletes them first, as stale shards would join the new ones in a glob.
"""
import os
import sys

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(DATA_DIR)
# train_gpt.py (shard format, tokenizer) lives in the repo root
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import glob  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from train_gpt import OneLineParser, UsageError, gpt2_encoding, write_json, write_shard  # noqa: E402
from bench.cli import run_tool, writable_folder  # noqa: E402

EOT = 50256  # <|endoftext|>
MAX_WORKERS = 4 * (os.cpu_count() or 1)
BATCH_DOCS = 256  # documents handed to the pool at a time: the next batch is read while this one is encoded


# -----------------------------------------------------------------------------
# Reading documents

def check_inputs(paths):
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--input {path}: no such file")
        if not path.endswith((".txt", ".jsonl")):
            raise UsageError(f"--input {path}: expected a .txt file (one document) or a .jsonl file "
                             "(one JSON object per line)")


def documents(paths, field):
    """Yields (text, size in bytes) for each document, in input order; bad input raises UsageError naming the
    file (and line)."""
    for path in paths:
        if path.endswith(".txt"):
            with open(path, "rb") as f:
                raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if text.strip():  # an empty file is no document, as a blank .jsonl line is none
                yield text, len(raw)
            continue
        skipped = 0  # bytes of blank lines, counted with the next document for the progress bar
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    skipped += len(raw)
                    continue
                try:
                    obj = json.loads(raw)
                except UnicodeDecodeError as e:
                    raise UsageError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
                except ValueError as e:
                    raise UsageError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise UsageError(f"{path}:{lineno}: expected a JSON object with a string field "
                                     f"\"{field}\" (choose the field with --field)")
                yield obj[field], len(raw) + skipped
                skipped = 0


def batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# Encoding (in worker processes) and writing shards

_encoding = None


def init_worker(encoding):
    global _encoding
    _encoding = encoding


def encode_document(text):
    ids = _encoding.encode_ordinary(text)
    tokens = np.empty(len(ids) + 1, dtype=np.uint16)
    tokens[0] = EOT
    tokens[1:] = ids
    return tokens


class ShardWriter:
    """Fills shards of shard_size tokens in order: val_000000.bin first, then train_000001.bin, ..."""

    def __init__(self, out_dir, shard_size):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.filled = 0
        self.written = []  # (path, tokens)

    def add(self, tokens):
        while len(tokens):
            take = min(len(tokens), self.shard_size - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_size:
                self.flush()

    def flush(self):
        if not self.filled:
            return
        index = len(self.written)
        name = "val_000000.bin" if index == 0 else f"train_{index:06d}.bin"
        path = os.path.join(self.out_dir, name)
        write_shard(path, self.buffer[:self.filled])
        self.written.append((path, self.filled))
        self.filled = 0


def existing_shards(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, "val_*.bin")) + glob.glob(os.path.join(out_dir, "train_*.bin")))


def tokenize(paths, out_dir, shard_size, workers, field="text", progress=True):
    """Encodes the documents of paths into shards in out_dir; returns (documents, ShardWriter)."""
    encoding = gpt2_encoding()  # built once here: offline, each worker would otherwise retry the download
    writer = ShardWriter(out_dir, shard_size)
    total_bytes = sum(os.path.getsize(p) for p in paths)
    n_docs = 0
    with mp.Pool(workers, initializer=init_worker, initargs=(encoding,)) as pool, \
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        def consume(job, sizes):
            for tokens in job.get():
                writer.add(tokens)
            bar.update(sum(sizes))
            bar.set_postfix(shards=len(writer.written), refresh=False)

        pending = None
        for batch in batches(documents(paths, field), BATCH_DOCS):
            texts, sizes = zip(*batch)
            job = pool.map_async(encode_document, texts, chunksize=max(1, len(texts) // (4 * workers)))
            if pending:
                consume(*pending)
            pending = (job, sizes)
            n_docs += len(batch)
        if pending:
            consume(*pending)
        bar.update(bar.total - bar.n)  # blank lines at the end of a .jsonl file
    writer.flush()
    return n_docs, writer


def write_meta(out_dir, paths):
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "source": [os.path.abspath(p) for p in paths]}
    path = os.path.join(out_dir, "meta.json")
    write_json(path, meta, indent=1)
    return path


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    parser = OneLineParser(description="Tokenize local .txt/.jsonl files with GPT-2's tokenizer into token shards "
                                       "for train_gpt.py (first shard val, the rest train).")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=".txt files (each one document) and/or .jsonl files (one JSON object per line)")
    parser.add_argument("--out_dir", required=True, metavar="DIR", help="folder for the shards and meta.json")
    parser.add_argument("--shard_size", type=int, default=10 ** 8, metavar="TOKENS",
                        help="tokens per shard (default 100,000,000); the first shard is the val split")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="encoding processes (default: the number of CPUs)")
    parser.add_argument("--field", default="text", help="the JSON key holding a .jsonl document's text")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete shards already in --out_dir first (otherwise their presence is an error)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.shard_size < 1 or args.shard_size > 2 ** 31 - 1:
        raise UsageError(f"--shard_size {args.shard_size}: must be between 1 and {2 ** 31 - 1} tokens")
    if not 1 <= args.workers <= MAX_WORKERS:
        raise UsageError(f"--workers {args.workers}: give 1 to {MAX_WORKERS} (4 per CPU of this machine)")
    check_inputs(args.input)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f"--out_dir {args.out_dir} is a file, not a folder: give a folder for the shards")
    old = existing_shards(args.out_dir)
    if old and not args.overwrite:
        raise UsageError(f"{args.out_dir} already holds {len(old)} shards ({os.path.basename(old[0])}, ...); "
                         "pass --overwrite to replace them or choose another --out_dir")
    writable_folder("out_dir", args.out_dir)
    stale_meta = os.path.join(args.out_dir, "meta.json")  # written last, once the shards are whole
    for path in old + ([stale_meta] if os.path.exists(stale_meta) else []):
        os.remove(path)
    t0 = time.time()
    try:
        n_docs, writer = tokenize(args.input, args.out_dir, args.shard_size, args.workers, args.field,
                                  progress=not args.no_progress)
    except BaseException:  # bad input or an interruption: no shards of a stream that did not finish
        for path in existing_shards(args.out_dir):
            os.remove(path)
        raise
    if not n_docs:
        raise UsageError(f"no documents in {' '.join(args.input)} (only blank lines?)")
    meta = write_meta(args.out_dir, args.input)
    val = writer.written[:1]
    train = writer.written[1:]
    print(f"documents:  {n_docs:,} from {len(args.input)} file(s)")
    print(f"val:        {sum(n for _, n in val):,} tokens in {len(val)} shard(s)"
          + (f"  {val[0][0]}" if val else ""))
    print(f"train:      {sum(n for _, n in train):,} tokens in {len(train)} shard(s)"
          + (f"  {train[0][0]} ... {os.path.basename(train[-1][0])}" if train else ""))
    print(f"meta:       {meta}")
    print(f"time:       {time.time() - t0:.1f}s")
    if not train:
        print(f"warning: all {sum(n for _, n in val):,} tokens went to the val shard and no train shard was written; "
              "use a smaller --shard_size", file=sys.stderr)


if __name__ == "__main__":
    run_tool(main)
