"""Training tokens: text files -> packed token shards on disk -> shuffled, resumable, rank-sliced batches.

Tokenizing happens once, on a CPU machine, and only the compact shards travel to the GPU machine:

    meta = build_shards(["docs/", "src/**/*.py"], tokenizer, "tokens/")   # shards-*/{train,heldout}_*.bin, meta.json
    batches = PackedTokens("tokens/", "train", seq_len=512, batch_size=8)  # iterator of LongTensor [8, 512]
    PackedTokens("tokens/,sampled/", ...)  # several builds, comma-separated, read as one

Without training text, `sample_corpus` writes jsonl documents sampled from the base itself (its own distribution, which
is what the auxiliary and predictor must imitate) for `build_shards` to tokenize.

Each document is tokenized without special tokens and followed by EOS; a split is the concatenation of its documents,
cut into non-overlapping windows of `seq_len` tokens. Batches hold input ids only: the trainer shifts them for
next-token targets (labels = input_ids, as Hugging Face causal LMs shift inside their loss), so the last token of a
window is never a target. Documents go to the held-out split by a hash of their text, so the splits never share one;
where that holds out none of several documents (a small corpus), the one with the smallest hash goes there.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .models import KVPredError, files_digest, fingerprint, out_folder, remove_dead_temporaries

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
JSONL_SUFFIX = ".jsonl"
SUFFIXES = TEXT_SUFFIXES + (JSONL_SUFFIX,)
EVAL_DATA = Path("/work/shared/data")
META_NAME = "meta.json"
SPLITS = ("train", "heldout")
SHARD_NAME = re.compile(r"(train|heldout)_\d{5}\.bin")  # what a build names its shards
SHARD_FOLDER = re.compile(r"shards-[0-9a-f]{16}")  # and the folder it keeps them in
FORMAT_VERSION = 1
# Tokenize this many characters per call: large enough for the Rust tokenizer to use both cores, small enough for RAM.
TOKENIZE_BATCH_CHARS = 4_000_000


# ---------------------------------------------------------------- sources -> files -> documents
def _is_eval_data(path: Path) -> bool:
    """The evaluation sets must never become training data, whatever path or link leads to them."""
    for form in (Path(os.path.abspath(path)), path.resolve()):
        parts = form.parts
        if any(parts[i:i + 2] == ("shared", "data") for i in range(len(parts) - 1)):
            return True
        if form.is_relative_to(EVAL_DATA) or form.is_relative_to(EVAL_DATA.resolve()):
            return True
    return False


def _refuse_eval_data(path: Path, source: str) -> None:
    if _is_eval_data(path):
        raise KVPredError(f"source {source!r} reaches {path}, which is evaluation data (under a shared/data "
                          "folder); never train or calibrate on the evaluation sets: pass text from elsewhere")


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `root` with one of `suffixes` (in any case), in sorted order, linked folders followed once each;
    hidden files and folders and __pycache__ are skipped."""
    found, walked = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:  # a link back up the tree, or a second way into a folder: its files are listed already
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        found += [Path(folder) / f for f in sorted(files) if not f.startswith(".") and f.lower().endswith(suffixes)]
    return found


def find_files(source: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The files `source` names: itself if it is a file, the files with one of `suffixes` under it if it is a
    folder (walked recursively), or those a glob matches (folders among them walked); each file once (by its real
    path, in the order first found); [] if there are none."""
    if glob.has_magic(source):
        matches = [Path(m) for m in sorted(glob.glob(source, recursive=True))]
        found = [f for m in matches if "__pycache__" not in m.parts
                 for f in (_walk(m, suffixes) if m.is_dir() else [m] if m.name.lower().endswith(suffixes) else [])]
    else:
        path = Path(source)
        found = _walk(path, suffixes) if path.is_dir() else [path] if path.is_file() else []
    once: dict[str, Path] = {}
    for f in found:
        once.setdefault(os.path.realpath(f), f)
    return list(once.values())


def _file_order_key(path: Path) -> str:
    return hashlib.sha1(os.fsencode(path.as_posix())).hexdigest()  # names need not be UTF-8


def expand_source(source: str, exclude: Sequence[str] = (), shuffle: bool = False) -> list[Path]:
    """A file, folder (walked recursively) or glob -> its .py/.txt/.md/.rst/.jsonl files.

    Order is sorted by path, or with shuffle=True a fixed pseudo-random order (a hash of each path as found from the
    source as given, so the same command reproduces it), so that a --max-tokens cap takes a spread of the source
    rather than its alphabetical head. `exclude` holds fnmatch patterns tested against each file's path, as found
    and made absolute (e.g. "*/tests/*").
    """
    if not source.strip():  # Path("") is the current directory, which nobody means
        raise KVPredError("a source is empty: give a file, folder or glob")
    _refuse_eval_data(Path(source), source)
    if not glob.has_magic(source) and not Path(source).exists():
        raise KVPredError(f"source {source!r} does not exist")
    if Path(source).is_file() and not source.endswith(SUFFIXES):
        raise KVPredError(f"source {source!r} is not a {'/'.join(SUFFIXES)} file")
    files = [f for f in find_files(source, SUFFIXES)
             if not any(fnmatch.fnmatch(name, pat) for name in (f.as_posix(), f.absolute().as_posix())
                        for pat in exclude)]
    if not files:
        raise KVPredError(f"source {source!r} matches no {'/'.join(SUFFIXES)} files"
                          + (f" outside the excluded patterns {list(exclude)}" if exclude else ""))
    for f in files:
        _refuse_eval_data(f, source)
    return sorted(files, key=_file_order_key) if shuffle else files


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """The documents in one file: its whole text, or one per jsonl line (that line's `text_field`).

    Raises UnicodeDecodeError for a file that is not UTF-8."""
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no text
    if not path.name.endswith(JSONL_SUFFIX):
        return [text]
    docs = []
    for lineno, line in enumerate(text.split("\n"), 1):  # JSON lines end at \n only: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise KVPredError(f"{path}:{lineno} is not valid JSON ({err})") from err
        value = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            has = (f"its {text_field!r} is {type(value).__name__}" if isinstance(row, dict) and text_field in row
                   else f"has {sorted(row) if isinstance(row, dict) else type(row).__name__}")
            raise KVPredError(f"{path}:{lineno} has no string field {text_field!r} ({has}); "
                              "choose the field with --text-field")
        docs.append(value)
    return docs


def _unit_hash(text: str) -> tuple[bytes, float]:
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()
    return digest, int.from_bytes(digest[:8], "big") / 2.0 ** 64


# ---------------------------------------------------------------- documents -> shards
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the id -> token table and EOS id: shards are only valid for a tokenizer with the same ids."""
    table = sorted((i, t) for t, i in tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([table, tokenizer.eos_token_id]).encode()).hexdigest()


def _write_atomic(path: Path, data: bytes | np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, np.ndarray):
        data.tofile(tmp)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)  # a killed build never leaves a half-written file under the final name


@dataclass
class _ShardWriter:
    """Appends tokens to one split and writes them out as flat shards of `shard_tokens` tokens (the last shorter)."""
    out_dir: Path
    split: str
    shard_tokens: int
    dtype: np.dtype
    shards: list[dict] = field(default_factory=list)
    documents: int = 0
    _buffer: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0

    @property
    def tokens(self) -> int:
        """Tokens added so far: the offset in the split of the next one."""
        return sum(s["tokens"] for s in self.shards) + self._buffered

    def add(self, tokens: np.ndarray) -> None:
        self._buffer.append(tokens.astype(self.dtype))
        self._buffered += len(tokens)
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> dict:
        if self._buffered:
            self._flush(self._buffered)
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents, "shards": self.shards}

    def _flush(self, n: int) -> None:
        flat = np.concatenate(self._buffer)
        name = f"{self.split}_{len(self.shards):05d}.bin"  # as SHARD_NAME matches
        _write_atomic(self.out_dir / name, flat[:n])
        self.shards.append({"file": name, "tokens": int(n)})
        self._buffer, self._buffered = [flat[n:]], len(flat) - n


def _documents(paths: Sequence[Path], text_field: str, heldout_fraction: float, seen: set[bytes], skipped: dict,
               bar) -> Iterator[tuple[str, str, float]]:
    """(split, text, hash in [0, 1)) for each new non-empty document in `paths`; duplicates, blanks and non-UTF-8
    files counted."""
    for path in paths:
        try:
            docs = read_documents(path, text_field)
        except UnicodeDecodeError:
            skipped["undecodable_files"].append(str(path))
            docs = []
        for text in docs:
            if not text.strip():
                skipped["empty_documents"] += 1
                continue
            digest, u = _unit_hash(text)
            if digest in seen:  # vendored copies, empty __init__ boilerplate: keep one, in one split only
                skipped["duplicate_documents"] += 1
                continue
            seen.add(digest)
            yield ("heldout" if u < heldout_fraction else "train"), text, u
        bar.update(path.stat().st_size)


def _batches(docs: Iterator[tuple[str, str, float]], max_chars: int) -> Iterator[list[tuple[str, str, float]]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _hold_out_one(out: Path, train: dict, start: int, length: int, shard_tokens: int, dtype: np.dtype) -> dict:
    """Both splits' metadata after moving the train split's tokens [start, start + length), one document, to the
    held-out split: the train shards are written again without it."""
    # every old shard is mapped before any is replaced: os.replace leaves a mapped file readable
    old = [np.memmap(out / s["file"], dtype=dtype, mode="r") for s in train["shards"]]
    kept, moved = _ShardWriter(out, "train", shard_tokens, dtype), _ShardWriter(out, "heldout", shard_tokens, dtype)
    offset = 0
    for shard in old:
        lo, hi = (int(np.clip(x - offset, 0, len(shard))) for x in (start, start + length))
        kept.add(shard[:lo])
        moved.add(shard[lo:hi])
        kept.add(shard[hi:])
        offset += len(shard)
    kept.documents, moved.documents = train["documents"] - 1, 1
    return {"train": kept.close(), "heldout": moved.close()}


def _tokenize_into(stage: Path, files: dict[str, list[Path]], tokenizer, *, label: str, shard_tokens: int,
                   max_tokens: int | None, heldout_fraction: float, text_field: str, progress: bool) -> dict:
    """`build_shards`' work: every source's documents tokenized into shards in `stage`; returns what was written."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    dtype = token_dtype(len(tokenizer))
    writers = {s: _ShardWriter(stage, s, shard_tokens, dtype) for s in SPLITS}
    skipped = {"duplicate_documents": 0, "empty_documents": 0, "undecodable_files": []}
    seen: set[bytes] = set()
    total = 0
    # (hash, start, length) of the train document with the smallest hash: held out if the rule holds out none
    first_out: tuple[float, int, int] | None = None
    bar = tqdm(total=sum(f.stat().st_size for fs in files.values() for f in fs), unit="B", unit_scale=True,
               desc=f"tokenizing into {label}", disable=not progress)

    def tokenize(batch: list[tuple[str, str, float]]) -> bool:
        """Append a batch of (split, text, hash) documents; False once max_tokens is reached."""
        nonlocal total, first_out
        ids = tokenizer([text for _, text, _ in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (split, _, u), doc in zip(batch, ids):
            tokens = np.array(doc + [eos], dtype=np.int64)
            if max_tokens is not None:
                tokens = tokens[:max_tokens - total]
            if split == "train" and (first_out is None or u < first_out[0]):
                first_out = (u, writers["train"].tokens, len(tokens))
            writers[split].add(tokens)
            writers[split].documents += 1
            total += len(tokens)
            if max_tokens is not None and total >= max_tokens:
                return False
        bar.set_postfix(tokens=f"{total:,}")
        return True

    per_source = []
    running = True
    try:  # the bar closed first, so an error prints on a line of its own
        for source, paths in files.items():
            tokens_before, docs_before = total, sum(w.documents for w in writers.values())
            duplicates_before = skipped["duplicate_documents"]
            texts = _documents(paths, text_field, heldout_fraction, seen, skipped, bar)
            nonempty = 0
            for batch in _batches(texts, TOKENIZE_BATCH_CHARS):
                nonempty += len(batch)
                if not (running := tokenize(batch)):
                    break
            per_source.append({"source": source, "files": len(paths), "tokens": total - tokens_before,
                               "documents": sum(w.documents for w in writers.values()) - docs_before})
            if not running:
                break
            if nonempty == 0 and skipped["duplicate_documents"] == duplicates_before:
                raise KVPredError(f"source {source!r} holds no text: its {len(paths)} file(s) are empty"
                                  + (f" or have no {text_field!r} field" if any(p.suffix == JSONL_SUFFIX for p in paths)
                                     else "") + " or are not UTF-8")
    finally:
        bar.close()
    splits = {s: w.close() for s, w in writers.items()}
    if heldout_fraction and not splits["heldout"]["documents"] and splits["train"]["documents"] >= 2:
        # decided only now, so that corpora whose hashes hold some out keep exactly the split they always had
        splits = _hold_out_one(stage, splits["train"], *first_out[1:], shard_tokens, dtype)
    if not splits["train"]["tokens"]:  # training would refuse it later; say why now, the earlier build kept
        raise KVPredError(f"the build would hold no training tokens: all {total:,} went to held-out documents"
                          + (" before --max-tokens cut it off; raise --max-tokens" if not running else "")
                          + " (or lower --heldout-fraction)")
    capped = max_tokens is not None and total >= max_tokens
    return {"dtype": dtype.name, "tokens": total, "splits": splits, "capped": capped, "sources": per_source,
            "skipped": skipped}


def build_shards(sources: Sequence[str], tokenizer, out_dir: str | Path, *, shard_tokens: int = 2 ** 23,
                 max_tokens: int | None = None, heldout_fraction: float = 0.01, text_field: str = "text",
                 exclude: Sequence[str] = (), shuffle_files: bool = False, tokenizer_name: str | None = None,
                 progress: bool = True) -> dict:
    """Tokenize `sources` once into train_NNNNN.bin / heldout_NNNNN.bin token shards + meta.json in `out_dir`, the
    shards in a folder of their own (shards-<digest>/).

    Sources are read in the order given (files in each in sorted order, or hashed order with shuffle_files), so with
    `max_tokens` (train + held-out) the first sources are taken whole and the last one is cut. Exact duplicate
    documents and empty ones are dropped; files that are not UTF-8 are skipped. Both are counted in meta.json.
    A document goes to the held-out split when its hash is below `heldout_fraction`; if that holds out none of two or
    more documents, the one with the smallest hash is held out, so that a small corpus still has a held-out split.
    meta.json is written last: a folder without it is an unfinished build. Until then the folder's earlier build, if
    any, stays whole, so a kill at any moment leaves one of the two. Returns the meta dict.
    """
    if not sources:
        raise KVPredError("no sources given: pass files, folders or globs of training text")
    if not 0 <= heldout_fraction < 1:
        raise KVPredError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if shard_tokens < 1 or (max_tokens is not None and max_tokens < 1):
        raise KVPredError(f"shard_tokens and max_tokens must be positive, got {shard_tokens} and {max_tokens}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KVPredError("the tokenizer has no EOS token, which separates documents in the packed stream")
    files = {s: expand_source(s, exclude, shuffle_files) for s in sources}  # every source checked before any work
    out = out_folder(out_dir, "the token shards")
    _check_meta_is_ours(out)
    remove_dead_temporaries(out, ".build-")
    stage = Path(tempfile.mkdtemp(dir=out, prefix=f".build-{os.getpid()}-"))  # an earlier build stays whole meanwhile
    try:
        built = _tokenize_into(stage, files, tokenizer, label=str(out), shard_tokens=shard_tokens,
                               max_tokens=max_tokens, heldout_fraction=heldout_fraction, text_field=text_field,
                               progress=progress)
        # every shard written, as builds always hashed them (a held-out rewrite's leftovers too): the same text gives
        # the digest an earlier build recorded, which a run resumes against
        digest = files_digest((shard.name, shard) for shard in sorted(stage.glob("*.bin")))
        listed = {s["file"] for split in built["splits"].values() for s in split["shards"]}
        for unlisted in stage.glob("*.bin"):  # a first pass's train shards past those a held-out rewrite kept
            if unlisted.name not in listed:
                unlisted.unlink()
        meta = {
            "format": FORMAT_VERSION,
            "tokenizer": {"name": tokenizer_name or getattr(tokenizer, "name_or_path", ""),
                          "vocab_size": len(tokenizer), "sha256": tokenizer_fingerprint(tokenizer),
                          "eos_token_id": eos},
            **built, "heldout_fraction": heldout_fraction, "max_tokens": max_tokens, "shard_tokens": shard_tokens,
            "text_field": text_field, "exclude": list(exclude), "shuffle_files": shuffle_files,
            "content_sha256": digest,
        }
        folder = _keep_shards(stage, out, meta)
        # the switch from the earlier build to this one: until this replace, meta.json names the earlier build's
        # shards, which are all still there; after it, this build's, which all are
        _write_atomic(out / META_NAME, (json.dumps(meta, indent=1) + "\n").encode())
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for stale in out.iterdir():  # earlier builds' shards: flat (before shard folders) or in their own folder
        if SHARD_NAME.fullmatch(stale.name) or (SHARD_FOLDER.fullmatch(stale.name) and stale != folder):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    return meta


def _keep_shards(stage: Path, out: Path, meta: dict) -> Path:
    """Move the staged shards to their own folder in `out`, named after their contents, and point `meta`'s shard
    entries into it. A folder of that name is the same build's (a rebuild of the same text) and is kept if whole."""
    folder = out / f"shards-{meta['content_sha256'][:16]}"
    for split in meta["splits"].values():
        for shard in split["shards"]:
            shard["file"] = f"{folder.name}/{shard['file']}"
    if folder.is_dir():
        try:
            for split in SPLITS:
                shard_files(out, meta, split)
            return folder
        except KVPredError:  # cut short by a kill while it was being removed as stale: replaced
            shutil.rmtree(folder)
    os.replace(stage, folder)
    return folder


def _check_meta_is_ours(out: Path) -> None:
    """A build replaces the META_NAME in `out`: refuse, before any work, one that no build made."""
    path = out / META_NAME
    try:
        ours = not path.exists() or {"format", "splits", "tokenizer"} <= set(json.loads(path.read_bytes()))
    except (ValueError, TypeError):
        ours = False
    if not ours:
        raise KVPredError(f"--out {out} holds a {META_NAME} that is not a kvpred token build's, which a build would "
                          "overwrite: choose another folder")


def read_meta(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / META_NAME
    if not path.is_file():
        raise KVPredError(f"{path} does not exist: {shard_dir} holds no finished token build; "
                          "make one with `kvpred data build`")
    try:  # what readers of a build rely on
        meta = json.loads(path.read_text())
        shards = [s for split in SPLITS for s in meta["splits"][split]["shards"]]
        if not all(isinstance(s["file"], str) and isinstance(s["tokens"], int) for s in shards):
            raise ValueError("a shard entry lacks its file name or token count")
        np.dtype(meta["dtype"]), meta["tokenizer"]["sha256"], meta["tokens"]
    except (ValueError, KeyError, TypeError) as err:
        raise KVPredError(f"{path} is corrupt ({type(err).__name__}: {err}); rebuild with `kvpred data build`") \
            from err
    return meta


def shard_folders(shard_dir: str | Path) -> list[Path]:
    """One token build, or several joined by commas ("mix/,sampled/"), whose splits are then read as one."""
    folders = [Path(d) for d in str(shard_dir).split(",") if d]
    reals = [os.path.realpath(f) for f in folders]
    if len(set(reals)) < len(reals):
        raise KVPredError(f"{shard_dir} names a token build twice: each is read once (to weight one more, "
                          "build it again into another folder)")
    return folders


def check_tokenizer(shard_dir: str | Path, tokenizer) -> None:
    """Raise unless `tokenizer` has the ids the shards in `shard_dir` (each build, if several) were built with."""
    for folder in shard_folders(shard_dir):
        built = read_meta(folder)["tokenizer"]
        if built["sha256"] != tokenizer_fingerprint(tokenizer):
            raise KVPredError(f"the tokens in {folder} were built with tokenizer {built['name']!r} "
                              f"({built['vocab_size']} tokens), which differs from this model's "
                              f"({len(tokenizer)} tokens); rebuild them with `kvpred data build --model ...`")


def shard_files(folder: Path, meta: dict, split: str) -> list[Path]:
    """A build's shard files of `split`, each checked to be there with the size `meta` says."""
    paths = []
    for shard in meta["splits"][split]["shards"]:
        path = folder / shard["file"]
        expected = shard["tokens"] * np.dtype(meta["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise KVPredError(f"{path} is missing or not {expected} bytes as {META_NAME} says; rebuild the shards")
        paths.append(path)
    return paths


# ---------------------------------------------------------------- shards -> windows -> batches
class TokenStream:
    """One split's shards (of each build, in order) as a single memory-mapped token sequence, cut into windows of
    `seq_len` tokens."""

    def __init__(self, shard_dir: str | Path, split: str, seq_len: int):
        if split not in SPLITS:
            raise KVPredError(f"split must be one of {SPLITS}, got {split!r}")
        if seq_len < 1:
            raise KVPredError(f"seq_len must be positive, got {seq_len}")
        self.split, self.seq_len = split, seq_len
        self.shards, self.content = [], []
        for folder in shard_folders(shard_dir):
            meta = read_meta(folder)
            self.shards += [np.memmap(path, dtype=meta["dtype"], mode="r") for path in shard_files(folder, meta, split)]
            # what each build holds; builds made before the digest existed: their meta.json's contents
            self.content.append(meta.get("content_sha256") or files_digest([("", Path(folder) / META_NAME)]))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # token offset of each shard in the split
        self.tokens = int(self.starts[-1])
        self.n_windows = self.tokens // seq_len  # the tail shorter than a window is never used
        if self.tokens == 0 and split == "heldout":
            raise KVPredError(f"{shard_dir} has no held-out split (built with --heldout-fraction 0); rebuild it with "
                              "one, or use another build's")
        if self.n_windows == 0:
            raise KVPredError(f"the {split} split of {shard_dir} has {self.tokens} tokens, less than one window of "
                              f"{seq_len}; build more data or use a smaller seq_len")

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split; a window may run across a shard boundary."""
        pieces = []
        while length > 0:
            i = int(np.searchsorted(self.starts, start, side="right")) - 1
            offset = start - int(self.starts[i])
            piece = self.shards[i][offset:offset + length]
            pieces.append(piece)
            start, length = start + len(piece), length - len(piece)
        return np.concatenate(pieces)

    def windows(self, indices: Sequence[int]) -> torch.Tensor:
        rows = [self.read(int(i) * self.seq_len, self.seq_len).astype(np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows))  # [len(indices), seq_len]


class PackedTokens:
    """Infinite iterator of LongTensor batches [batch_size, seq_len] from one split, resumable and rank-sliced.

    Global step s takes the windows perm_e[j*G:(j+1)*G] with G = batch_size * world_size, e = s // steps_per_epoch,
    j = s % steps_per_epoch and perm_e a permutation of all windows seeded by (seed, e); rank r gets rows
    [r*batch_size:(r+1)*batch_size] of that global batch. So W ranks together see exactly what one process with
    batch_size*W would, and the whole position is the step number (`state_dict`). Windows left over after the last
    full global batch of an epoch are skipped in that epoch (a different remainder in the next).
    """

    def __init__(self, shard_dir: str | Path, split: str = "train", *, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise KVPredError(f"need batch_size >= 1 and 0 <= rank < world_size, "
                              f"got {batch_size=}, {rank=}, {world_size=}")
        self.stream = TokenStream(shard_dir, split, seq_len)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.global_batch_size = batch_size * world_size
        self.steps_per_epoch = self.stream.n_windows // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise KVPredError(f"the {split} split has {self.stream.n_windows} windows of {seq_len} tokens, fewer than "
                              f"one global batch of {self.global_batch_size}; lower batch_size or seq_len")
        self.step = 0
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = self.stream.n_windows
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def window_indices(self, step: int) -> np.ndarray:
        """Window indices of global batch `step`, all ranks' rows in rank order."""
        epoch, j = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[j * self.global_batch_size:(j + 1) * self.global_batch_size]

    def global_batch(self, step: int) -> torch.Tensor:
        return self.stream.windows(self.window_indices(step))  # [batch_size * world_size, seq_len]

    def local_batch(self, step: int) -> torch.Tensor:
        rows = self.window_indices(step)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return self.stream.windows(rows)  # [batch_size, seq_len]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.local_batch(self.step)
        self.step += 1
        return batch

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def state_dict(self) -> dict:
        """JSON-able position: the next batch is global step `step` (epoch, cursor are informative)."""
        return {"split": self.split, "seed": self.seed, "shuffle": self.shuffle, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "n_windows": self.stream.n_windows,
                "tokens": self.stream.tokens, "content": self.stream.content, "step": self.step, "epoch": self.epoch,
                "cursor": (self.step % self.steps_per_epoch) * self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off; the data and the global batch must be the same."""
        current = self.state_dict()
        if state.get("content", current["content"]) != current["content"]:  # (older checkpoints have none)
            raise KVPredError("cannot resume: the token build(s) given hold other tokens than the run was trained on "
                              f"(content {state['content']} then, {current['content']} now): rebuilt since? Resume "
                              "with the same data, or train into a new folder")
        for key in ("split", "seq_len", "global_batch_size", "n_windows", "tokens"):
            if state[key] != current[key]:
                raise KVPredError(f"cannot resume: the saved data position has {key}={state[key]!r} but this "
                                  f"iterator has {current[key]!r}; resume with the same token build, seq_len "
                                  "and batch_size * world_size")
        self.seed, self.shuffle, self.step = state["seed"], state["shuffle"], state["step"]
        self._perm_epoch = -1


def heldout_windows(shard_dir: str | Path, seq_len: int, n: int) -> torch.Tensor:
    """A fixed LongTensor [n, seq_len] of held-out windows, evenly spaced over the held-out split."""
    stream = TokenStream(shard_dir, "heldout", seq_len)
    if not 1 <= n <= stream.n_windows:
        raise KVPredError(f"asked for {n} held-out windows of {seq_len} tokens but the held-out split has "
                          f"{stream.n_windows}; ask for fewer or build with a larger --heldout-fraction")
    return stream.windows(np.linspace(0, stream.n_windows - 1, n).round().astype(np.int64))


# ---------------------------------------------------------------- sampling a corpus from the base
def topic_words(tokenizer, min_letters: int = 4) -> list[str]:
    """Whole lower-case words of the vocabulary (byte-level BPE marks a leading space with 'Ġ', SentencePiece with
    '▁'), capitalised: the openings of sampled documents, so their topics spread over what the tokenizer knows."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    words = sorted({t[1:] for t in vocab if t and t[0] in "Ġ▁" and t[1:].isascii() and t[1:].isalpha()
                    and t[1:].islower() and len(t) > min_letters})
    if not words:
        raise KVPredError("the tokenizer has no whole-word tokens to open sampled documents with")
    return [w.capitalize() for w in words]


def _sampled_tokens(batch_file: Path) -> int:
    """The tokens a finished batch file of `sample_corpus` holds (what a resumed run counts as done)."""
    try:
        return sum(json.loads(line)["tokens"] for line in batch_file.read_text().splitlines() if line.strip())
    except (ValueError, KeyError, TypeError):
        raise KVPredError(f"{batch_file} is not a batch of sampled documents (JSON lines with a \"tokens\" count), "
                          "but the folder resumes from such files: sample into another folder") from None


SAMPLING_NAME = "sampling.json"  # the settings a sampled folder was made with, checked when a run resumes into it
OPENING_TOKENS = 8  # a generous bound on an opening word's tokens
CHAT_TURN_TOKENS = 16  # and on the chat template's tokens around one exchange


def _check_sampling_settings(out: Path, sampled: bool, settings: dict) -> None:
    """Record `settings` in a folder that holds no samples yet; in one that has a record, refuse others, so that a
    resumed run cannot mix two kinds of documents (samples of an earlier version, without a record, go unchecked)."""
    path = out / SAMPLING_NAME
    if not path.is_file():
        if not sampled:
            _write_atomic(path, (json.dumps(settings, indent=1) + "\n").encode())
        return
    recorded = json.loads(path.read_text())
    changed = [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in settings.items()
               if recorded.get(key) != value]
    if changed:
        raise KVPredError(f"{out} holds documents sampled with other settings ({', '.join(changed)}; {path}): sample "
                          "into a new folder, or give the first run's settings to resume it")


def chat_prefix(tokenizer, conversation: Sequence[dict] = ()) -> str:
    """The chat template rendered up to where the next user message after `conversation` begins (for the first
    message, a default system message included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise KVPredError("the tokenizer has no chat template to sample chats with; sample plain documents instead")
    marker = "\x00user\x00"
    text = tokenizer.apply_chat_template([*conversation, {"role": "user", "content": marker}], tokenize=False)
    return text[:text.index(marker)]


def _continue(model, tokenizer, prompts: list[str], max_new_tokens: int, **sampling) -> list[list[int]]:
    """Sampled continuations of `prompts`, each cut before its first EOS."""
    eos = tokenizer.eos_token_id
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                    padding_side="left")  # generate() appends after the last column, so padding must go first
    enc = enc.to(next(model.parameters()).device)
    ids = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=eos,
                         eos_token_id=eos, **sampling)
    return [row[:row.index(eos)] if eos in row else row for row in ids[:, enc.input_ids.shape[1]:].tolist()]


def _documents_batch(model, tokenizer, rng, size: int, max_new_tokens: int, words: list[str],
                     **sampling) -> list[tuple[str, int]]:
    prompts = [words[i] for i in rng.integers(len(words), size=size)]
    rows = _continue(model, tokenizer, prompts, max_new_tokens, **sampling)
    return [(prompt + tokenizer.decode(row, skip_special_tokens=True), len(row)) for prompt, row in zip(prompts, rows)]


def _chats_batch(model, tokenizer, rng, size: int, max_new_tokens: int, user_tokens: int, turns: int,
                 **sampling) -> list[tuple[str, int]]:
    """Chats of up to `turns` exchanges, both sides written by the model: each user message is sampled after the
    template's opening of a user turn, then the assistant's reply to the conversation so far; a chat whose user has
    nothing (more) to say ends there. The text is the rendered conversation, special tokens as text."""
    ended, live = [], [([], 0)] * size  # (messages, sampled tokens)
    for _ in range(turns):
        users = _continue(model, tokenizer, [chat_prefix(tokenizer, m) for m, _ in live], user_tokens, **sampling)
        asked = []
        for (messages, n), row in zip(live, users):
            if text := tokenizer.decode(row, skip_special_tokens=True).strip():
                asked.append((messages + [{"role": "user", "content": text}], n + len(row)))
            elif messages:
                ended.append((messages, n))
        prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _ in asked]
        replies = _continue(model, tokenizer, prompts, max_new_tokens, **sampling) if asked else []
        live = [(m + [{"role": "assistant", "content": tokenizer.decode(r, skip_special_tokens=True).strip()}],
                 n + len(r)) for (m, n), r in zip(asked, replies)]
    eos = tokenizer.eos_token or ""
    return [(tokenizer.apply_chat_template(m, tokenize=False).rstrip().removesuffix(eos), n)  # the shards add EOS
            for m, n in ended + live]


@torch.no_grad()
def sample_corpus(model, tokenizer, out_dir: str | Path, tokens: int, *, batch_size: int = 256,
                  max_new_tokens: int = 512, temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
                  openings: Sequence[str] | None = None, chat: bool = False, user_tokens: int = 128, turns: int = 1,
                  progress: bool = True) -> int:
    """Sample documents from `model` until `tokens` tokens, as out_dir/sample_NNNNN.jsonl files of {"text", "tokens"}
    lines, one file per batch written atomically. Batch b opens its documents with `openings` (default: the
    vocabulary's words) drawn with seed (seed, b), so a killed run resumes after its last finished file. With `chat`,
    each document is instead a chat in the tokenizer's template: up to `turns` exchanges of a user message of at most
    `user_tokens` and a reply of at most `max_new_tokens`, both sampled. Returns the tokens sampled in all."""
    from tqdm.auto import tqdm

    if tokenizer.eos_token_id is None:
        raise KVPredError("the tokenizer has no EOS token, which ends a sampled document")
    if chat:
        longest = len(tokenizer(chat_prefix(tokenizer), add_special_tokens=False).input_ids) + turns * (
            user_tokens + max_new_tokens + CHAT_TURN_TOKENS)  # chat_prefix: no template is refused here
        make = partial(_chats_batch, user_tokens=user_tokens, turns=turns)
    else:
        longest = OPENING_TOKENS + max_new_tokens
        make = partial(_documents_batch, words=list(openings or topic_words(tokenizer)))
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        shape = (f"with --chat, {turns} exchange(s) of a user message of at most {user_tokens} tokens and a reply "
                 f"of at most {max_new_tokens}" if chat
                 else f"at most {max_new_tokens} new tokens after an opening word")
        raise KVPredError(f"documents {shape} reach about {longest} tokens, beyond the model's position limit of "
                          f"{limit}: lower --max-new-tokens{', --user-tokens or --turns' if chat else ''}")
    out = out_folder(out_dir, "the sampled documents")
    done = sorted(out.glob("sample_*.jsonl"))
    total = sum(_sampled_tokens(f) for f in done)
    _check_sampling_settings(out, bool(done), {
        "model": fingerprint(model), "chat": chat, "turns": turns if chat else None,
        "user_tokens": user_tokens if chat else None, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "top_p": top_p, "seed": seed,
        "openings": None if openings is None else hashlib.sha256("\n".join(openings).encode()).hexdigest()[:16]})
    bar = tqdm(total=tokens, initial=min(total, tokens), unit="tok", unit_scale=True, desc=f"sampling into {out}",
               disable=not progress)
    # after the highest number there: files a user removed must not make a new batch overwrite a kept one
    batch = max((int(f.stem.removeprefix("sample_")) + 1 for f in done if f.stem.removeprefix("sample_").isdigit()),
                default=0)
    while total < tokens:
        rng = np.random.default_rng([seed, batch])
        torch.manual_seed(int(rng.integers(2 ** 31)))
        docs = make(model, tokenizer, rng, batch_size, max_new_tokens, temperature=temperature, top_p=top_p)
        total += sum(n for _, n in docs)
        lines = "".join(json.dumps({"text": text, "tokens": n}) + "\n" for text, n in docs)
        _write_atomic(out / f"sample_{batch:05d}.jsonl", lines.encode())
        bar.update(min(total, tokens) - bar.n)
        batch += 1
    bar.close()
    return total


# ---------------------------------------------------------------- command line
def register(subparsers) -> None:
    from .cli import command_help

    p = subparsers.add_parser("data", help=command_help("data"),
                              description="Tokenize training text once into compact token shards for `kvpred train`.")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="tokenize files/folders/globs into token shards + meta.json",
                       description="Tokenize .py/.txt/.md/.rst/.jsonl sources with a model's tokenizer into "
                                   "train_NNNNN.bin / heldout_NNNNN.bin (uint16 when the vocabulary fits) in a "
                                   "shards-<digest>/ folder, and meta.json. A new build into the same folder "
                                   "replaces the earlier one only once it is whole. Evaluation data under "
                                   "shared/data is refused.")
    b.add_argument("--model", default="smollm2-135m", help="model whose tokenizer to use (alias, folder, hub id)")
    b.add_argument("--sources", nargs="+", required=True, help="files, folders (recursive) or quoted globs")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--shard-tokens", type=int, default=2 ** 23, help="tokens per shard file (default 2**23)")
    b.add_argument("--max-tokens", type=int, default=None,
                   help="stop after this many tokens in all (train + held-out); earlier sources are taken first")
    b.add_argument("--heldout-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    b.add_argument("--text-field", default="text", help="field of each jsonl line that holds the text")
    b.add_argument("--exclude", action="append", default=[],
                   help="fnmatch pattern on full file paths to leave out, e.g. '*/tests/*' (repeatable)")
    b.add_argument("--shuffle-files", action="store_true",
                   help="read each source's files in a fixed hashed order, so --max-tokens samples it evenly")
    b.set_defaults(func=_build)
    g = sub.add_parser("sample", help="sample training documents from the base model itself (jsonl)",
                       description="Write documents sampled from the base (each opened by a random vocabulary word, "
                                   "or chat turns with --chat) as sample_NNNNN.jsonl files, for `kvpred data build "
                                   "--sources DIR`: training text in the base's own distribution, where no corpus is "
                                   "at hand. Resumes.")
    g.add_argument("--model", default="smollm2-135m", help="base model to sample from (alias, folder, hub id)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--tokens", type=int, required=True, help="stop after this many sampled tokens")
    g.add_argument("--batch-size", type=int, default=256,
                   help="documents sampled at once; each batch is one file (the last may overshoot --tokens)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="longest document, in tokens")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling cut")
    g.add_argument("--seed", type=int, default=0, help="seed of the openings and the sampling, per batch")
    g.add_argument("--chat", action="store_true",
                   help="sample chats in the tokenizer's chat template instead: a user message, then the reply "
                        "(at most --max-new-tokens), both written by the model, --turns times")
    g.add_argument("--user-tokens", type=int, default=128, help="longest user message with --chat, in tokens")
    g.add_argument("--turns", type=int, default=1,
                   help="exchanges per chat with --chat: each later user message follows up on the conversation")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where there is a GPU)")
    g.set_defaults(func=_sample)
    i = sub.add_parser("info", help="print a token build's meta.json summary")
    i.add_argument("dir", help="folder made by `kvpred data build`")
    i.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    from .model import CONFIG_NAME, KVPConfig
    from .models import load_tokenizer

    checkpoint = Path(args.model) / CONFIG_NAME  # a kvpred checkpoint tokenizes as its base does
    base = KVPConfig.from_json(checkpoint.read_bytes(), str(checkpoint)).base if checkpoint.is_file() else args.model
    tokenizer = load_tokenizer(base)
    meta = build_shards(args.sources, tokenizer, args.out, shard_tokens=args.shard_tokens, max_tokens=args.max_tokens,
                        heldout_fraction=args.heldout_fraction, text_field=args.text_field, exclude=args.exclude,
                        shuffle_files=args.shuffle_files, tokenizer_name=args.model)
    _print_summary(args.out, meta)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .decoding import check_decoding
    from .models import load_causal_lm

    if min(args.tokens, args.batch_size, args.max_new_tokens, args.user_tokens, args.turns) < 1:
        raise KVPredError("--tokens, --batch-size, --max-new-tokens, --user-tokens and --turns must be positive")
    if args.turns > 1 and not args.chat:
        raise KVPredError("--turns samples chats of several exchanges: add --chat")
    check_decoding(1, True, args.temperature, args.top_p, 0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = load_causal_lm(args.model, dtype=dtype, device=args.device)
    total = sample_corpus(model, tokenizer, args.out, args.tokens, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, chat=args.chat, user_tokens=args.user_tokens, turns=args.turns)
    print(f"{args.out}: {total:,} sampled tokens")
    return 0


def _info(args: argparse.Namespace) -> int:
    _print_summary(args.dir, read_meta(args.dir))
    return 0


def _print_summary(shard_dir: str, meta: dict) -> None:
    size = sum(path.stat().st_size for split in SPLITS for path in shard_files(Path(shard_dir), meta, split))
    print(f"{shard_dir}: {meta['tokens']:,} tokens ({meta['dtype']}, {size / 2 ** 20:.1f} MiB), tokenizer "
          f"{meta['tokenizer']['name']} ({meta['tokenizer']['vocab_size']} ids)"
          + (f", capped at {meta['max_tokens']:,}" if meta["capped"] else ""))
    for split, info in meta["splits"].items():
        print(f"  {split}: {info['tokens']:,} tokens, {info['documents']:,} documents, {len(info['shards'])} shard(s)")
    skipped = meta["skipped"]
    print(f"  skipped: {skipped['duplicate_documents']} duplicate and {skipped['empty_documents']} empty documents, "
          f"{len(skipped['undecodable_files'])} non-UTF-8 files")
