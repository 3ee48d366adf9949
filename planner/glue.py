"""A pipeline object for a model folder whose components are weightless twins: its glue (scheduler, tokenizers,
image processors) built from the folder's files where they exist, from the class defaults where they do not.

Tokenizers without files become a stand-in: a small word-level tokenizer with the paired text encoder's documented
maximum length (`max_position_embeddings`, or `n_positions`, else 512). On meta only token *counts* matter
(the encoders compute shapes, not values), and pipelines pad or truncate to those lengths; a pipeline that pads to
its longest prompt gets the stand-in's word count. Each stand-in is named in the returned notes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

logger = logging.getLogger(__name__)

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
WORDS = "a an the of on in with and photo painting picture cat dog astronaut horse riding mars red blue".split()
VOCAB: dict[str, int] = {t: i for i, t in enumerate([PAD, EOS, UNK, BOS, *WORDS])}
STAND_IN_MAX_LENGTH = 512  # T5's documented n_positions: the length tokenizers of encoders without one report


def word_tokenizer(max_length: int, bos: bool = False):
    """Word-level tokenizer: lowercase, whitespace split, `[<s>] words </s>`, padded with <pad>."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{BOS} $A {EOS}" if bos else f"$A {EOS}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, VOCAB[t]) for t in (BOS, EOS)]
    )
    extra = {"bos_token": BOS} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_length, padding_side="right",
        pad_token=PAD, eos_token=EOS, unk_token=UNK, **extra,
    )


def _max_length(encoder: torch.nn.Module | None) -> int:
    config = getattr(encoder, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return STAND_IN_MAX_LENGTH


def _paired_encoder(name: str, modules: dict[str, torch.nn.Module]) -> torch.nn.Module | None:
    """diffusers' convention: `tokenizer_2` feeds `text_encoder_2`."""
    return modules.get(name.replace("tokenizer", "text_encoder", 1))


def _library_class(library: str, class_name: str):
    import importlib

    try:
        return getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return None


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _tokenizer(name: str, cls, folder: Path, modules: dict) -> tuple[object, str | None]:
    if _has_files(folder):
        try:
            return cls.from_pretrained(folder), None
        except Exception as err:  # a missing optional dependency (sentencepiece, tiktoken), a broken file
            reason = f"its files could not be loaded ({type(err).__name__}: {err})"
    else:
        reason = "no tokenizer files in the folder"
    length = _max_length(_paired_encoder(name, modules))
    return word_tokenizer(length), f"{name}: stand-in word-level tokenizer, max length {length} ({reason})"


def _glue_component(name: str, library: str, class_name: str, folder: Path, modules: dict):
    """(object, note or None) for one non-module entry of model_index.json."""
    from diffusers.configuration_utils import ConfigMixin
    from transformers import PreTrainedTokenizerBase

    cls = _library_class(library, class_name)
    if cls is None:
        return None, f"{name}: {library}.{class_name} is not importable here; passed as None"
    if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase):
        return _tokenizer(name, cls, folder, modules)
    if isinstance(cls, type) and issubclass(cls, ConfigMixin):  # schedulers, guiders, diffusers processors
        config = next((f for f in folder.glob("*config.json")), None) if folder.is_dir() else None
        if config is not None:
            return cls.from_config(cls.load_config(config)), None
        return cls(), f"{name}: no config in the folder; {class_name} with its default config"
    try:  # transformers image processors / feature extractors
        return (cls.from_pretrained(folder), None) if _has_files(folder) else (cls(), None)
    except Exception as err:
        return None, f"{name}: {class_name} could not be built ({type(err).__name__}: {err}); passed as None"


def build_pipeline(pipeline_class: str, index: dict, path: Path,
                   modules: dict[str, torch.nn.Module]) -> tuple[object, list[str]]:
    """The folder's pipeline with `modules` as its models; optional entries missing or null are passed as None."""
    import diffusers

    with quiet_libraries():  # import-time fallbacks and disclaimers about glue the user never asked for
        cls = getattr(diffusers, pipeline_class, None)
        if cls is None:
            raise ValueError(f"diffusers has no pipeline class {pipeline_class!r} (model_index.json of {path}); "
                             "is your diffusers too old?")
        return _build(cls, index, path, modules)


@contextlib.contextmanager
def quiet_libraries():
    """diffusers' and transformers' own warnings (deprecations, fallbacks, disclaimers) silenced for a block that
    runs their code on memplan's behalf; memplan states its own assumptions."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _build(cls, index: dict, path: Path, modules: dict) -> tuple[object, list[str]]:
    params = inspect.signature(cls.__init__).parameters
    kwargs, notes = {}, []
    for name, value in index.items():
        if name.startswith("_") or name not in params:
            continue
        if name in modules:
            kwargs[name] = modules[name]
        elif isinstance(value, list) and len(value) == 2 and None not in value:
            kwargs[name], note = _glue_component(name, value[0], value[1], path / name, modules)
            notes += [note] if note else []
        else:
            kwargs[name] = None
    missing = [n for n, p in params.items() if n != "self" and n not in kwargs and p.default is inspect.Parameter.empty
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    kwargs.update({n: None for n in missing})
    notes += [f"{n}: not in model_index.json; passed as None" for n in missing]
    for note in notes:
        logger.info("%s", note)
    return cls(**kwargs), notes
