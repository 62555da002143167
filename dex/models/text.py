"""The text side of MedMoE: radiology reports to the features of the global and local image-text contrastive losses.

A :class:`TextEncoder` holds a Hugging Face ``transformers`` BERT-style encoder and its tokenizer. For B reports
padded to T word pieces, :meth:`TextEncoder.encode` gives the report's global embedding [B, H], which the global
loss aligns with the pooled image feature, and the word features [B, T, H] with their mask [B, T], over which the
local (word-region) loss attends.

The encoder a :class:`TextConfig` names is one of two kinds:

- ``"local"`` (ours): a small BERT trained from scratch, with an uncased WordPiece tokenizer trained on the run's
  own reports by :func:`train_wordpiece`. Nothing is downloaded.
- a pretrained clinical or biomedical BERT: a Hugging Face model name already in the local cache, or a folder. It
  is read with ``local_files_only=True`` and from safetensors only.

:func:`save_text_encoder` writes a folder that :func:`load_text_encoder` (and ``transformers.AutoModel`` /
``AutoTokenizer``) read back offline. The folder holds ``config.json`` + ``model.safetensors`` from
``save_pretrained``, the tokenizer files and ``dex_text.json`` (our settings), and nothing in it is unpickled, as
with the image encoders' folders (:mod:`dex.models.weights`).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # transformers and tokenizers load where they are used: importing dex stays light
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dex._version import __version__
from dex.config import STRICT

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0-4, BERT's names
CONTINUING_PREFIX = "##"
SETTINGS_NAME = "dex_text.json"
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def train_wordpiece(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer trained on ``texts`` with ``tokenizers``, wrapped as a
    ``transformers.BertTokenizerFast`` (``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip).

    BERT's normaliser (lowercasing, accents stripped), BERT's pre-tokeniser (whitespace and punctuation), the special
    tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4), ``##`` continuing pieces and the ``[CLS] A [SEP]``
    template. The same texts give the same vocabulary in every process.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_wordpiece: no texts to train the tokenizer on")
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # tokenizers' trainer numbers the continuing pieces ("##x") in hash-map order, so ties between merges are broken
    # differently from run to run (huggingface/tokenizers#1794). Given first, sorted, as reserved tokens, those
    # pieces get fixed ids, and the vocabulary depends on the texts alone (ours).
    words = (word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    continuing = [CONTINUING_PREFIX + char for char in sorted({char for word in words for char in word[1:]})]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                        special_tokens=[*SPECIAL_TOKENS, *continuing],
                                        continuing_subword_prefix=CONTINUING_PREFIX)
    draft = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=CONTINUING_PREFIX))
    draft.normalizer, draft.pre_tokenizer = normalizer, pre_tokenizer
    draft.train_from_iterator(texts, trainer)
    # The tokenizer is rebuilt from the learnt vocabulary, so only the five BERT tokens are special (ours).
    tokenizer = Tokenizer(models.WordPiece(draft.get_vocab(), unk_token="[UNK]",
                                           continuing_subword_prefix=CONTINUING_PREFIX))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUING_PREFIX)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("[CLS]", "[SEP]")])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=True)


@STRICT
@dataclass
class TextConfig:
    """The text encoder of a MedMoE run.

    ``name`` is ``"local"`` (ours: a small BERT built from the fields below, with a WordPiece tokenizer trained on the
    run's reports), or the Hugging Face name or local folder of a pretrained BERT-style encoder (e.g. a clinical or
    biomedical BERT). It is read offline (``local_files_only=True``) and from safetensors only, so a user downloads
    it first (``hf download NAME``, or ``save_pretrained`` into a folder). For a pretrained encoder only
    ``max_length`` applies; its architecture, vocabulary and dropout are its own.
    """

    name: str = "local"
    vocab_size: int = 1000  # the WordPiece vocabulary, special tokens included; at least every character seen
    hidden_size: int = 64  # H
    layers: int = 2
    heads: int = 2
    intermediate_size: int = 128
    max_length: int = 64  # word pieces per report, [CLS] and [SEP] included; longer reports are cut
    pooling: Literal["mean", "cls"] = "mean"  # the global embedding: the mean of the real words, or [CLS]
    dropout: float = 0.1  # hidden and attention dropout


class TextOutput(NamedTuple):
    """The features of B reports of T word pieces (T: the longest in the batch, at most ``max_length``)."""

    global_embedding: Tensor  # [B, H]: the mean of the real words' last hidden states, or the [CLS] token's
    words: Tensor  # [B, T, H]: the last hidden states
    word_mask: Tensor  # [B, T] bool: True at real word pieces; padding, [CLS] and [SEP] are False


class TextEncoder(nn.Module):
    """A ``transformers`` encoder and its tokenizer: reports -> :class:`TextOutput`.

    The global embedding (``pooling``, ours) is the mean of the real words' last hidden states (the default: a small
    BERT trained from scratch separates reports by it several times faster than by its [CLS] token, measured on the
    phantom reports), or the [CLS] token's (as MedCLIP; for a pretrained BERT whose [CLS] was trained), with no
    pooler layer: the model is built or loaded without one, so that every parameter gets a gradient, as
    ``DistributedDataParallel`` requires (ours). ``[UNK]`` and ``[MASK]`` positions count as words.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 pooling: Literal["mean", "cls"] = "mean") -> None:
        super().__init__()
        where = tokenizer.name_or_path or "the text encoder"
        if tokenizer.pad_token_id is None or tokenizer.cls_token_id is None:
            raise ValueError(f"{where}: its tokenizer has no pad or [CLS] token; a BERT-style encoder is needed")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"{where}: max_length {max_length} is more than its {limit} positions")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"{where}: pooling must be mean or cls, got {pooling!r}")
        self.model, self.tokenizer, self.max_length, self.pooling = model, tokenizer, max_length, pooling
        non_words = sorted({tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id} - {None})
        self.register_buffer("non_word_ids", torch.tensor(non_words), persistent=False)

    @property
    def hidden_size(self) -> int:
        """H, the width of the embeddings."""
        return self.model.config.hidden_size

    def tokenize(self, texts: list[str], device: torch.device | str | None = None) -> dict[str, Tensor]:
        """``input_ids`` and ``attention_mask`` [B, T] on ``device`` (default: the encoder's), padded to the longest
        report and cut at ``max_length``."""
        batch = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt", return_token_type_ids=False)
        device = self.non_word_ids.device if device is None else device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextOutput:
        """``input_ids``, ``attention_mask`` [B, T] -> global embedding [B, H], words [B, T, H], word mask [B, T]."""
        words = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        word_mask = attention_mask.bool() & ~torch.isin(input_ids, self.non_word_ids)
        if self.pooling == "cls":
            return TextOutput(words[:, 0], words, word_mask)
        weights = word_mask.unsqueeze(-1).to(words.dtype)
        return TextOutput((words * weights).sum(1) / weights.sum(1).clamp_min(1), words, word_mask)

    def encode(self, texts: list[str], device: torch.device | str | None = None) -> TextOutput:
        """:meth:`tokenize` then :meth:`forward`."""
        return self(**self.tokenize(texts, device))


def build_text_encoder(config: TextConfig, texts: Iterable[str] | None = None) -> TextEncoder:
    """The encoder ``config`` names. ``"local"`` trains its tokenizer on ``texts`` (the run's reports) and builds a
    BERT of random weights; any other name is read offline (see :class:`TextConfig`)."""
    if config.name != "local":
        if Path(config.name).is_dir():
            _check_weights(Path(config.name))
        return _read_pretrained(config.name, config.max_length, config.pooling)
    if texts is None:
        raise ValueError('text encoder "local": it trains its tokenizer on the run\'s reports; pass them as texts')
    from transformers import BertConfig, BertModel

    tokenizer = train_wordpiece(texts, config.vocab_size)
    bert = BertConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_length, hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout, pad_token_id=tokenizer.pad_token_id,
    )
    return TextEncoder(BertModel(bert, add_pooling_layer=False), tokenizer, config.max_length, config.pooling)


def save_text_encoder(encoder: TextEncoder, directory: str | Path) -> Path:
    """Write ``encoder`` into ``directory``: ``config.json`` + ``model.safetensors``, the tokenizer files and
    ``dex_text.json`` (``max_length``), the latter written last, through a temporary file and a rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(directory, safe_serialization=True)
    encoder.tokenizer.save_pretrained(directory)
    settings = {"max_length": encoder.max_length, "pooling": encoder.pooling, "library": f"dex-medvision {__version__}"}
    tmp = directory / (SETTINGS_NAME + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    tmp.replace(directory / SETTINGS_NAME)
    return directory


def load_text_encoder(directory: str | Path) -> TextEncoder:
    """The encoder :func:`save_text_encoder` wrote into ``directory``, read offline from safetensors, in eval mode
    (as ``from_pretrained`` leaves it). A folder with only pickled weights (``pytorch_model.bin``) is refused."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such folder")
    _check_weights(directory)
    settings_path = directory / SETTINGS_NAME
    if not settings_path.is_file():
        raise FileNotFoundError(f"{settings_path}: missing; not a folder written by save_text_encoder")
    try:
        settings = json.loads(settings_path.read_text())
        max_length, pooling = settings["max_length"], settings.get("pooling", "cls")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{settings_path}: not a dex text settings file ({type(err).__name__}: {err})") from err
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"{settings_path}: max_length is {max_length!r}, not a number of word pieces (2 or more)")
    return _read_pretrained(directory, max_length, pooling)


def _check_weights(folder: Path) -> None:
    """Pass when ``folder`` has safetensors weights; refuse pickled ones by name."""
    if any((folder / name).is_file() for name in SAFE_WEIGHTS):
        return
    for name in PICKLED_WEIGHTS:
        if (folder / name).is_file():
            raise ValueError(f"{folder / name}: refused: pickled weights are not loaded, for safety; convert them to "
                             "model.safetensors")
    raise FileNotFoundError(f"{folder}: no model.safetensors; not a text encoder folder")


def _read_pretrained(source: str | Path, max_length: int, pooling: Literal["mean", "cls"]) -> TextEncoder:
    """A model and its tokenizer from a folder or the local Hugging Face cache, never the network; float32 (ours:
    a checkpoint stored in half precision is trained in float32)."""
    from transformers import MODEL_MAPPING, AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(source), local_files_only=True)
        model_class = MODEL_MAPPING[type(config)]
        pooler_option = "add_pooling_layer" in inspect.signature(model_class).parameters
        no_pooler = {"add_pooling_layer": False} if pooler_option else {}
        model = model_class.from_pretrained(str(source), config=config, local_files_only=True, use_safetensors=True,
                                            **no_pooler)
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"{source}: cannot read a text encoder offline from safetensors ({reason}); download it "
                         "first") from err
    return TextEncoder(model.float(), tokenizer, max_length, pooling)
