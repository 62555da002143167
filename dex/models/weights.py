"""Weights in and out: warm start from a plain ViT or MAE checkpoint or any encoder's weights (read by
:func:`dex.safeload.load_state_dict_file`, converted by :mod:`dex.models.conversions`), the director path exported
as a standard timm ViT, and ``save_pretrained`` / ``load_pretrained`` folders.

A folder is ``config.json`` (timm's hub layout: architecture, model_args, pretrained_cfg; plus dex's
``preprocessing`` block, a :class:`dex.data.preprocess.Preprocessing`) and ``model.safetensors``, so
``timm.create_model("local-dir:FOLDER", pretrained=True)`` reads it too. :func:`load_preprocessing` reads the
preprocessing back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import timm
from torch import Tensor, nn

from dex._version import __version__
from dex.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from dex.models.conversions import director_state_dict, vit_to_dex_state_dict
from dex.models.dex_vit import VIT_SIZES, DEXViT
from dex.safeload import load_state_dict_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class LoadReport(NamedTuple):
    """What :func:`init_from_vit_checkpoint` left at the model's initialisation."""

    initialised: list[str]  # parameters with no counterpart in the checkpoint (routers, head, decoder)


def init_from_vit_checkpoint(model: nn.Module, path: str | Path) -> LoadReport:
    """Initialise a DEX model (encoder or MAE) from a plain ViT or MAE checkpoint file on disk.

    Raises a ``ValueError`` naming the file and the keys when the checkpoint does not fit the model
    (a missing encoder tensor, an unknown key, a shape that differs).
    """
    converted = vit_to_dex_state_dict(load_state_dict_file(path), model)
    missing = _load_fitting(model, converted, path, ("head.", "encoder.head.", "mask_token", "decoder_"))
    return LoadReport(sorted(set(missing) | {k for k in model.state_dict() if ".dex.router." in k}))


def init_encoder(encoder: nn.Module, path: str | Path) -> LoadReport:
    """Initialise an encoder from weights on disk: a dex encoder folder (its ``model.safetensors``: a ``dex export``
    of any method, a run's ``encoder/``) or a checkpoint file. A :class:`DEXViT` as :func:`init_from_vit_checkpoint`
    (a plain ViT's or MAE's weights converted, a DEX encoder's as they are); any other encoder (a timm Swin or ViT)
    takes the tensors as they are, its classifier head excepted. A ``ValueError`` names the file and the keys that
    do not fit."""
    path = Path(path)
    path = path / WEIGHTS_NAME if path.is_dir() else path
    if isinstance(encoder, DEXViT):
        return init_from_vit_checkpoint(encoder, path)
    weights = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("head.")}
    return LoadReport(sorted(_load_fitting(encoder, weights, path, ("head.",))))


def _load_fitting(model: nn.Module, state_dict: dict[str, Tensor], path: str | Path,
                  may_stay: tuple[str, ...]) -> list[str]:
    """Load ``state_dict`` into ``model`` when every key and shape fits and only keys starting with ``may_stay``
    are missing (returned); otherwise a ValueError naming ``path`` and the keys."""
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state_dict.items()
                   if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state_dict]
    not_optional = [k for k in missing if not k.startswith(may_stay)]
    problems = []
    if unexpected:
        problems.append(f"keys the model does not have: {unexpected}")
    if wrong_shape:
        problems.append(f"shapes that differ: {wrong_shape}")
    if not_optional:
        problems.append(f"encoder tensors missing from the checkpoint: {not_optional}")
    if problems:
        raise ValueError(f"{path}: does not fit {type(model).__name__}; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=False)
    return missing


def timm_vit_config(model: DEXViT) -> tuple[str, dict[str, Any]]:
    """The registered timm ViT name and the arguments that build the director path of ``model``."""
    args = model.model_args
    dims = dict(embed_dim=args["embed_dim"], depth=args["depth"], num_heads=args["num_heads"])
    size = next((name for name, sized in VIT_SIZES.items() if sized == dims), "base")
    architecture = f"vit_{size}_patch{args['patch_size']}_224"
    vit_args = dict(
        img_size=args["img_size"], patch_size=args["patch_size"], in_chans=args["in_chans"],
        num_classes=args["num_classes"], global_pool=args["global_pool"], fc_norm=False, class_token=True,
        mlp_ratio=args["mlp_ratio"], qkv_bias=args["qkv_bias"], **dims,
    )
    return architecture, vit_args


def model_preprocessing(model_args: dict[str, Any]) -> Preprocessing:
    """The preprocessing of a model built with ``model_args``: the default :class:`Preprocessing` at its
    ``img_size``; for a one-channel model (``in_chans=1``), the ImageNet statistics averaged over the channels, as
    timm does. Other channel counts have no default statistics: a ValueError."""
    channels = model_args.get("in_chans", 3)
    if channels == 1:
        return Preprocessing(size=model_args["img_size"], channels=1, mean=(sum(IMAGENET_MEAN) / 3,),
                             std=(sum(IMAGENET_STD) / 3,))
    if channels != 3:
        raise ValueError(f"a model of in_chans={channels}: the default preprocessing (ImageNet z-score) is defined "
                         "for 1 or 3 input channels")
    return Preprocessing(size=model_args["img_size"])


def _pretrained_cfg(preprocessing: Preprocessing, num_classes: int) -> dict[str, Any]:
    """timm's pretrained_cfg, its input size and z-score taken from ``preprocessing``."""
    return {
        "input_size": [preprocessing.channels, *preprocessing.size],
        "num_classes": num_classes,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "interpolation": preprocessing.interpolation,
        "crop_pct": 1.0,
        "fixed_input_size": True,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def _write_folder(directory: str | Path, architecture: str, model_args: dict[str, Any],
                  tensors: dict[str, Tensor], num_features: int | None = None) -> Path:
    directory = Path(directory)
    preprocessing = model_preprocessing(model_args)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": architecture,
        "num_classes": model_args.get("num_classes", 0),
        "num_features": num_features or model_args["embed_dim"],
        "global_pool": model_args.get("global_pool", "token"),
        "model_args": model_args,
        "pretrained_cfg": _pretrained_cfg(preprocessing, model_args.get("num_classes", 0)),
        "preprocessing": preprocessing.to_dict(),
        "library": f"dex-medvision {__version__}",
    }
    save_safetensors(tensors, directory / WEIGHTS_NAME)
    config_tmp = directory / (CONFIG_NAME + ".tmp")
    config_tmp.write_text(json.dumps(config, indent=2) + "\n")
    config_tmp.replace(directory / CONFIG_NAME)
    return directory


def save_safetensors(tensors: dict[str, Tensor], path: str | Path) -> None:
    """``tensors`` (moved to the CPU) as a ``.safetensors`` file, written through a temporary file and a rename, so
    that the file at ``path`` is always whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def create_model(architecture: str, **model_args: Any) -> nn.Module:
    """``timm.create_model(architecture, pretrained=False, **model_args)``; a model that is not a
    :class:`DEXViT` (e.g. a timm Swin) keeps its arguments as ``model.model_args``, as a DEXViT reports its own, so
    that :func:`save_pretrained` writes a folder :func:`load_pretrained` rebuilds."""
    model = timm.create_model(architecture, pretrained=False, **model_args)
    if not isinstance(model, DEXViT):
        model.model_args = dict(model_args)
    return model


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (a :class:`DEXViT` in any mode, the routing statistics included, or a model from
    :func:`create_model`) as config.json + model.safetensors."""
    architecture = getattr(model, "pretrained_cfg", {}).get("architecture") or "dex_vit_base_patch16_256"
    if not isinstance(getattr(model, "model_args", None), dict):
        raise ValueError(f"a {type(model).__name__} without model_args: build it with dex.models.create_model")
    return _write_folder(directory, architecture, model.model_args, model.state_dict(), model.num_features)


def export_director(model: DEXViT, directory: str | Path) -> Path:
    """Write the director path of ``model`` as a standard timm ViT folder.

    ``timm.create_model("local-dir:DIR", pretrained=True)`` and :func:`load_pretrained` give a
    ``VisionTransformer`` whose features equal ``model``'s in ``director`` mode.
    """
    architecture, vit_args = timm_vit_config(model)
    return _write_folder(directory, architecture, vit_args, director_state_dict(model))


def load_pretrained(directory: str | Path, **overrides: Any) -> nn.Module:
    """Build the model described by ``DIR/config.json`` and load ``DIR/model.safetensors`` strictly.

    Works for :func:`save_pretrained` folders (a :class:`DEXViT`) and :func:`export_director` folders (a timm
    ``VisionTransformer``). ``overrides`` replace saved model arguments (e.g. ``mode="experts"``).
    """
    config_path, config = _read_config(directory)
    try:
        architecture, model_args = config["architecture"], dict(config["model_args"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{config_path}: not a model config ({err})") from err
    directory = Path(directory)
    model = create_model(architecture, **{**model_args, **overrides})
    state_dict = load_state_dict_file(directory / WEIGHTS_NAME)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{directory / WEIGHTS_NAME}: does not match {config_path} ({err})") from err
    return model


def _read_config(directory: str | Path) -> tuple[Path, dict[str, Any]]:
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; not a folder written by save_pretrained or export_director")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not a model config ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a model config (a JSON {type(config).__name__}, not an object)")
    return config_path, config


def load_preprocessing(directory: str | Path) -> Preprocessing:
    """The :class:`Preprocessing` of a :func:`save_pretrained` / :func:`export_director` folder: its config.json's
    ``preprocessing`` block, or, for a folder written before models recorded it, the default at the model's
    ``img_size`` (what every dex model was fed). A bad block raises a ``ValueError`` naming the file and the key."""
    config_path, config = _read_config(directory)
    try:
        if "preprocessing" in config:
            return Preprocessing.from_dict(config["preprocessing"])
        return model_preprocessing(dict(config["model_args"]))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{config_path}: not a model config ({err})") from err
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from err
