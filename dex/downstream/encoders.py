"""Encoders to fine-tune, from a short description.

``source`` is one of:
- ``scratch``: a randomly initialised plain ViT of ``model``'s size (``num_experts: 0``), or a random DEX encoder
  with ``scratch_experts: true``;
- a folder written by ``dex export`` / ``save_pretrained`` (a DEX encoder, or a timm ViT such as ``OUT/director``);
- a ``dex pretrain`` run folder (its final encoder, else its newest checkpoint): DEX or the MAE baseline;
- a ``dex finetune`` model folder: its fine-tuned encoder (without the head or decoder);
- ``timm:ARCH:FILE``: a timm ViT checkpoint file on disk (e.g. ImageNet MAE or DINO weights): ARCH is built without
  weights at ``img_size``, FILE is read without unpickling (``.safetensors``, a PyTorch state dict, or a JAX ``.npz``
  that the model's own ``load_pretrained`` reads), converted by the architecture's checkpoint filter (MAE, DINO,
  CLIP layouts; position embeddings resampled to the model's grid), and must then fit the encoder exactly;
- ``peer``: a conventional network trained from scratch next to the foundation encoders (:mod:`dex.models.peers`):
  ``model: unet`` (segmentation: nnU-Net's 2D U-Net, the whole network, at ``img_size``, default 128) or a timm CNN
  such as ``model: resnet18`` (classification, at ``img_size``, default timm's); ``model_args`` for more arguments
  (the U-Net's ``features``, ``max_features``). A peer is fine-tuned whole (no drop path, no layer decay, no
  frozen, partial or LoRA adaptation, no frozen probes) and only on its own task type.

``img_size`` sets the input size of every source. ``scratch``, ``timm:ARCH:FILE`` and ``peer`` are built at it (a
timm file's position embeddings resampled by the architecture's checkpoint filter, once, from the file's grid). A
pretrained encoder (an exported or saved folder, a run, a fine-tuned model's encoder) is loaded at its own size and
brought to ``img_size`` by the model's own ``set_input_size``: a ViT's patch grid and absolute position embeddings
(:meth:`dex.models.DEXViT.set_input_size`: the sin-cos table of the new grid, or a bicubic resampling of a learned
table, the class token's entry kept; timm's ``VisionTransformer.set_input_size``: bicubic resampling), a Swin's
grid, windows (scaled with the grid) and relative position tables (timm's ``SwinTransformer.set_input_size``); its
other weights are kept. The size must be a multiple of the encoder's patch size (a Swin: of 32). The model is then
recorded (:func:`encoder_architecture`) and fed (:func:`encoder_preprocessing`: the folder's recorded preprocessing,
its size replaced) at ``img_size``, so its fine-tuned model folder rebuilds at that size.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models import get_model_args
from torch import Tensor, nn

from dex.config import STRICT, ConfigError, validate
from dex.data.preprocess import Preprocessing
from dex.downstream.task_model import is_task_model, load_model
from dex.models import DEXViT, load_pretrained, load_state_dict_file, vit_to_dex_state_dict
from dex.models.backbones import input_multiple, input_size, trainable_units
from dex.models.peers import create_peer, peer_architecture
from dex.models.unetr import UNETR2D
from dex.models.weights import load_preprocessing

PEER = "peer"  # the source of a peer (dex.models.peers)


@STRICT
@dataclass
class EncoderSpec:
    name: str
    source: str = "scratch"
    model: str = "dex_vit_tiny_patch16_256"  # architecture for scratch; for a peer: unet or a timm CNN
    img_size: int | None = None  # input size; a pretrained encoder is brought to it (module docstring)
    mode: Literal["experts", "director"] | None = None  # DEX only: DEX-E or DEX-D; None keeps the saved mode
    top_k: int | None = None  # DEX-E only
    scratch_experts: bool = False  # scratch: a random DEX encoder instead of a plain ViT
    model_args: dict[str, Any] = field(default_factory=dict)  # scratch, peer: more timm.create_model arguments

    @classmethod
    def parse(cls, name: str, value: Any, where: str, check: bool = True) -> EncoderSpec:
        """A suite's entry: a source, or a mapping of the fields; with ``check``, :func:`check_encoder` too."""
        fields = {"source": value} if isinstance(value, str) else value
        if not isinstance(fields, dict):
            raise ConfigError(f"{where}: encoder {name!r}: give a source or a mapping of its fields, not {value!r}")
        spec = validate(cls, {"name": name, **fields}, f"{where}: encoders.{name}")
        if check:
            check_encoder(spec, where)
        return spec


def _scratch_args(spec: EncoderSpec) -> dict[str, Any]:
    plain = not spec.scratch_experts and _is_dex_architecture(spec.model)
    args = {**spec.model_args, **({"num_experts": 0} if plain else {})}
    return {**args, "img_size": spec.img_size} if spec.img_size else args


def _is_dex_architecture(architecture: str) -> bool:
    """Whether ``architecture`` is one of the ``dex_vit_*`` models (which take ``num_experts``)."""
    return timm.is_model(architecture) and timm.models.model_entrypoint(architecture).__module__ == DEXViT.__module__


def check_encoder(spec: EncoderSpec, where: str) -> None:
    """What can be known of an encoder before anything is fine-tuned: the architecture exists and takes the
    arguments (built on the meta device, which costs no memory), the files are there."""
    problem = None
    if spec.source == "scratch":
        try:
            with torch.device("meta"):
                timm.create_model(spec.model, pretrained=False, **_scratch_args(spec))
        except (RuntimeError, TypeError, ValueError) as err:  # timm: "Unknown model"; the model: an argument
            problem = f"model {spec.model!r} with model_args {spec.model_args}: {err}"
    elif spec.source == PEER:
        try:
            with torch.device("meta"):
                create_peer(spec.model, spec.img_size, spec.model_args)
        except (RuntimeError, TypeError, ValueError) as err:
            problem = f"peer model {spec.model!r} with model_args {spec.model_args}: {err}"
    elif spec.source.startswith("timm:"):
        arch, _, file = spec.source.removeprefix("timm:").partition(":")
        if not arch or not file:
            problem = f"{spec.source!r} is not timm:ARCH:FILE"
        elif not timm.is_model(arch):
            problem = f"timm has no architecture {arch!r}"
        elif not Path(file).is_file():
            problem = f"{file}: no such file"
    elif not any((Path(spec.source) / name).is_file() for name in ("config.json", "config.yaml")):
        problem = (f"{spec.source}: neither an exported encoder (config.json) nor a pretraining run (config.yaml)")
    if problem:
        raise ConfigError(f"{where}: encoder {spec.name!r}: {problem}")


def load_encoder(spec: EncoderSpec) -> nn.Module:
    if spec.source == "scratch":
        encoder = timm.create_model(spec.model, pretrained=False, **_scratch_args(spec))
    elif spec.source == PEER:
        encoder = create_peer(spec.model, spec.img_size, spec.model_args)
    elif spec.source.startswith("timm:"):
        arch, _, file = spec.source.removeprefix("timm:").partition(":")
        if not arch or not file:
            raise ValueError(f"encoder {spec.name!r}: {spec.source!r} is not timm:ARCH:FILE")
        encoder = timm_file_encoder(arch, file, spec.img_size)
    else:
        path = Path(spec.source)
        if is_task_model(path):  # a dex finetune folder: its fine-tuned encoder
            network = load_model(path).network
            encoder = network.encoder if isinstance(network, UNETR2D) else network
        elif (path / "config.json").is_file():
            encoder = load_pretrained(path)
        elif (path / "config.yaml").is_file():
            from dex.train.runs import run_encoder

            encoder = run_encoder(path)
        else:
            raise FileNotFoundError(f"{path}: encoder {spec.name!r} is neither an exported encoder (config.json) nor "
                                    "a pretraining run (config.yaml)")
    if spec.img_size and spec.source != PEER:
        _to_input_size(encoder, spec)
    if isinstance(encoder, DEXViT) and encoder.dex_modules():
        if spec.mode or spec.top_k:
            encoder.set_mode(spec.mode or "experts", spec.top_k)
        elif encoder.mode == "pretrain":
            encoder.set_mode("experts")  # fine-tuning goes through the experts by default (DEX-E)
    elif spec.mode or spec.top_k:
        raise ValueError(f"encoder {spec.name!r}: mode and top_k apply to DEX encoders only")
    return encoder


def _to_input_size(encoder: nn.Module, spec: EncoderSpec) -> None:
    """Bring ``encoder`` (loaded from ``spec``) to inputs of ``spec.img_size`` px, in place, by the model's own
    ``set_input_size`` (see the module docstring); a timm model's ``model_args`` become those timm records for the
    resized model (``timm.models.get_model_args``: the new ``img_size``, a Swin's windows), which rebuild it. An
    encoder already at that size is left as it is. A size that is not a multiple of :func:`input_multiple`, or an
    encoder without ``set_input_size``, raises a ``ValueError`` naming the encoder."""
    multiple = input_multiple(encoder)
    if spec.img_size % multiple:
        raise ValueError(f"encoder {spec.name!r}: img_size {spec.img_size} is not a multiple of {multiple}, the "
                         f"patch size (a Swin: the last reduction) of its {type(encoder).__name__}")
    if input_size(encoder) == (spec.img_size, spec.img_size):
        return
    if not hasattr(encoder, "set_input_size"):
        raise ValueError(f"encoder {spec.name!r}: a {type(encoder).__name__} has no set_input_size, so it cannot be "
                         f"brought to img_size {spec.img_size}; leave img_size unset to use it at its own "
                         f"{list(input_size(encoder))}")
    encoder.set_input_size((spec.img_size, spec.img_size))
    if not isinstance(encoder, DEXViT):  # a DEXViT's model_args follow its size
        encoder.model_args = get_model_args(encoder)


def encoder_architecture(spec: EncoderSpec, encoder: nn.Module) -> tuple[str, dict[str, Any]]:
    """The timm architecture and arguments that rebuild ``encoder`` (loaded from ``spec``, no head) without its
    weights: a DEX encoder's own ``model_args`` (its mode and K, and the input size it was brought to, included),
    those :func:`dex.models.create_model` recorded (a Swin) or :func:`load_encoder` set for a timm model it resized,
    else what its source records."""
    if isinstance(getattr(encoder, "model_args", None), dict):  # a DEXViT, dex.models.create_model, resized
        return encoder.pretrained_cfg.get("architecture") or "dex_vit_base_patch16_256", {**encoder.model_args,
                                                                                           "num_classes": 0}
    if spec.source.startswith("timm:"):
        arch = spec.source.removeprefix("timm:").partition(":")[0]
        return arch, {"num_classes": 0, **({"img_size": spec.img_size} if spec.img_size else {})}
    if spec.source == "scratch":
        return spec.model, {**_scratch_args(spec), "num_classes": 0}
    if spec.source == PEER:
        architecture, args = peer_architecture(spec.model, spec.img_size, spec.model_args)
        return architecture, {**args, "num_classes": 0}
    config = json.loads((Path(spec.source) / "config.json").read_text())
    if is_task_model(spec.source):
        return config["network"]["encoder_architecture"], {**config["network"]["encoder_args"], "num_classes": 0}
    return config["architecture"], {**config["model_args"], "num_classes": 0}  # an export_director folder


def encoder_preprocessing(spec: EncoderSpec, encoder: nn.Module) -> Preprocessing:
    """How images are fed to ``encoder`` (loaded from ``spec``): what its model folder records
    (:func:`dex.models.weights.load_preprocessing`; with ``spec.img_size``, its size replaced by the one the encoder
    was brought to), else the default :class:`Preprocessing` at its input size. A folder whose recorded size is not
    the model's raises a ``ValueError`` naming it."""
    size = input_size(encoder)
    folder = Path(spec.source)
    if spec.source in ("scratch", PEER) or spec.source.startswith("timm:") or not (folder / "config.json").is_file():
        return Preprocessing(size=size)
    preprocessing = load_preprocessing(folder)
    if spec.img_size:
        return dataclasses.replace(preprocessing, size=size)
    if preprocessing.size != size:
        raise ValueError(f"{folder / 'config.json'}: preprocessing size {list(preprocessing.size)} is not the model's "
                         f"input size {list(size)}")
    return preprocessing


def timm_file_encoder(arch: str, file: str | Path, img_size: int | None = None) -> nn.Module:
    """The timm model ``arch`` (no classifier, at ``img_size`` when given) with the weights of ``file``.

    The file is read by :func:`dex.load_state_dict_file` (safetensors, or a weights-only torch file: nothing is
    unpickled) and converted by the architecture's own checkpoint filter; classifier keys are dropped and the rest
    must fit the model exactly. A JAX ``.npz`` file is read by the model's ``load_pretrained`` (timm's ViTs).
    Raises ``ValueError`` (or ``FileNotFoundError``) naming the file.
    """
    if not timm.is_model(arch):
        raise ValueError(f"timm:{arch}:{file}: timm has no architecture {arch!r}")
    encoder = timm.create_model(arch, pretrained=False, num_classes=0, **({"img_size": img_size} if img_size else {}))
    if str(file).endswith(".npz"):
        _load_npz(encoder, arch, Path(file))
        return encoder
    state_dict = load_state_dict_file(file)
    convert = _checkpoint_filter(arch, encoder)
    if convert is not None:
        try:
            state_dict = convert(state_dict, encoder)
        except Exception as err:  # each filter fails in its own way (KeyError, shapes) on a layout it cannot read
            raise ValueError(f"{file}: {arch}'s checkpoint filter cannot convert it ({type(err).__name__}: {err})"
                             ) from err
    classifier = encoder.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    own = encoder.state_dict()
    problems = []
    if unexpected := sorted(set(state_dict) - set(own)):
        problems.append(f"keys the model does not have: {_some(unexpected)}")
    if wrong_shape := [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state_dict.items()
                       if k in own and v.shape != own[k].shape]:
        problems.append(f"shapes that differ: {_some(wrong_shape)}")
    if missing := [k for k in own if k not in state_dict]:
        problems.append(f"encoder tensors missing from the file: {_some(missing)}")
    if problems:
        raise ValueError(f"{file}: does not fit {arch}; " + "; ".join(problems))
    encoder.load_state_dict(state_dict)
    return encoder


def _checkpoint_filter(arch: str, encoder: nn.Module) -> Callable[..., dict[str, Tensor]] | None:
    """The function timm applies to this architecture's pretrained weights: DEX's ViT conversion for the
    ``dex_vit_*`` models, else the ``checkpoint_filter_fn`` of the timm module that registers ``arch``."""
    if isinstance(encoder, DEXViT):
        return vit_to_dex_state_dict
    module = sys.modules[timm.models.model_entrypoint(arch).__module__]
    return getattr(module, "checkpoint_filter_fn", None)


def _load_npz(encoder: nn.Module, arch: str, path: Path) -> None:
    if not hasattr(encoder, "load_pretrained"):
        raise ValueError(f"{path}: a JAX .npz checkpoint, which {arch} cannot read (timm's ViTs can)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        encoder.load_pretrained(str(path))  # numpy without pickle: an array of Python objects raises
    except Exception as err:
        raise ValueError(f"{path}: not a JAX .npz checkpoint that {arch} reads ({type(err).__name__}: {err})") from err


def _some(keys: list[str], shown: int = 8) -> str:
    return str(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def freeze_all_but_last(encoder: nn.Module, blocks: int) -> None:
    """Train only the last ``blocks`` blocks (and the final norm): the embeddings and earlier blocks are frozen. A
    Swin's blocks count across its stages, a stage's patch merging training with the stage's first block."""
    units = trainable_units(encoder)
    if not 0 <= blocks <= len(units):
        raise ValueError(f"trainable_blocks must be between 0 and {len(units)}, got {blocks}")
    keep = {id(p) for unit in units[len(units) - blocks:] for module in unit for p in module.parameters()}
    keep |= {id(p) for p in encoder.norm.parameters()}
    for param in encoder.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)
