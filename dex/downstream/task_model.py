"""A fine-tuned model as a folder people keep and run: the network (the encoder with its classification head, or a
2D UNETR on it), the task it was trained for and the one preprocessing its inputs go through.

A folder holds ``config.json`` (what builds the network, the task, the preprocessing block of
:class:`dex.data.preprocess.Preprocessing`, for a segmentation model the ``inference`` block of
:class:`dex.downstream.windows.SlidingWindow` (its windows, overlap and mirroring), the ``plans`` that derived its
fine-tuning (:mod:`dex.downstream.plans`), and the SHA-256 of the weights) and ``model.safetensors`` (every
tensor of the network). :func:`load_model` builds the network from the config, checks the weights against the
recorded hash and loads them strictly; nothing is unpickled. ``dex finetune`` adds ``metrics.json``, ``log.jsonl``,
``curves.png`` and a model card (``README.md``) next to them (:mod:`dex.downstream.model_folder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from dex._version import __version__
from dex.data.preprocess import Preprocessing
from dex.downstream.windows import SlidingWindow
from dex.files import file_sha256, write_json
from dex.models.weights import save_safetensors
from dex.safeload import load_state_dict_file

FORMAT = "dex-task-model"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TaskType = Literal["classification", "segmentation"]


def build_network(task_type: TaskType, classes: int, encoder_architecture: str, encoder_args: dict[str, Any],
                  feature_size: int = 16) -> nn.Module:
    """The network of a task: the encoder (``timm.create_model(encoder_architecture, **encoder_args)``, no
    weights) with a linear head of ``classes`` outputs on its pooled feature, or a :class:`UNETR2D` of ``classes``
    channels (background included) on it; a U-Net peer (:mod:`dex.models.peers`) is the whole segmentation network,
    of ``classes`` channels."""
    # here, so that ``import dex`` (which offers load_model) needs no MONAI; the import registers the U-Net in timm
    from dex.models.peers import UNET_ARCHITECTURE
    from dex.models.unetr import UNETR2D

    whole = task_type == "classification" or encoder_architecture == UNET_ARCHITECTURE
    network = timm.create_model(encoder_architecture, pretrained=False,
                                **{**encoder_args, "num_classes": classes if whole else 0})
    return network if whole else UNETR2D(network, classes, feature_size)


class TaskModel(nn.Module):
    """A network with what it needs to be used: task type, class names, preprocessing, and how it was built.

    ``forward(x [B, 3, H, W] model inputs)`` gives logits ([B, C], or [B, C, H, W] for segmentation);
    :meth:`predict` gives probabilities (softmax over the classes), a segmentation's through its ``inference``
    sliding window (any H, W), when it has one.
    """

    def __init__(self, network: nn.Module, task_type: TaskType, classes: list[str], preprocessing: Preprocessing,
                 encoder_architecture: str, encoder_args: dict[str, Any], feature_size: int = 16,
                 task: dict[str, Any] | None = None, inference: SlidingWindow | None = None,
                 plans: dict[str, Any] | None = None) -> None:
        super().__init__()
        if task_type not in ("classification", "segmentation"):
            raise ValueError(f"task type must be classification or segmentation, got {task_type!r}")
        self.network = network
        self.task_type, self.classes, self.preprocessing = task_type, list(classes), preprocessing
        self.encoder_architecture, self.encoder_args = encoder_architecture, dict(encoder_args)
        self.feature_size = feature_size
        self.task = dict(task or {})  # name, modality and the like, for the record
        self.inference = inference if task_type == "segmentation" else None
        self.plans = dict(plans or {})

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    @torch.no_grad()
    def predict(self, x: Tensor, mirror: str | None = None, batch_size: int = 8) -> Tensor:
        """Class probabilities of model inputs ``x`` [B, 3, H, W]: [B, C], or [B, C, H, W] per pixel, by the
        model's sliding window (``mirror`` overriding its mirroring; ``batch_size`` windows a forward) where it
        has one."""
        if self.inference is None:
            return self.network(x).float().softmax(dim=1)
        window = self.inference if mirror is None else SlidingWindow(self.inference.window, self.inference.overlap,
                                                                     mirror)
        return window(self.network, x, batch_size).float().softmax(dim=1)

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "task": {**self.task, "type": self.task_type, "classes": self.classes},
            "network": {"encoder_architecture": self.encoder_architecture, "encoder_args": self.encoder_args,
                        **({"feature_size": self.feature_size} if self.task_type == "segmentation" else {})},
            "preprocessing": self.preprocessing.to_dict(),
            **({"inference": self.inference.to_dict()} if self.inference is not None else {}),
            **({"plans": self.plans} if self.plans else {}),
            "library": f"dex-medvision {__version__}",
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each whole or not at all)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.network.state_dict(), directory / WEIGHTS_NAME)
        write_json(directory / CONFIG_NAME, {**self.config(), "weights_sha256": file_sha256(directory / WEIGHTS_NAME)})
        return directory


def is_task_model(directory: str | Path) -> bool:
    path = Path(directory) / CONFIG_NAME
    try:
        return path.is_file() and json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> TaskModel:
    """The :class:`TaskModel` of a folder written by :meth:`TaskModel.save` (``dex finetune``), in eval mode.

    A missing file, weights whose SHA-256 is not the one recorded (altered or cut short), or a config that does not
    describe a task model raise an error naming the file.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; {directory} is not a complete dex finetune model folder")
    try:
        config = json.loads(config_path.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"format is {config.get('format')!r}, not {FORMAT!r}")
        task, network = config["task"], config["network"]
        preprocessing = Preprocessing.from_dict(config["preprocessing"])
        inference = SlidingWindow.from_dict(config["inference"]) if "inference" in config else None
        recorded = config["weights_sha256"]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{config_path}: not a dex task model config ({err})") from err
    if file_sha256(weights_path) != recorded:
        raise ValueError(f"{weights_path}: its SHA-256 is not the one {config_path} records (the file was altered "
                         "or cut short)")
    feature_size = network.get("feature_size", 16)
    model = TaskModel(build_network(task["type"], len(task["classes"]), network["encoder_architecture"],
                                    network["encoder_args"], feature_size),
                      task["type"], task["classes"], preprocessing, network["encoder_architecture"],
                      network["encoder_args"], feature_size,
                      {k: v for k, v in task.items() if k not in ("type", "classes")}, inference,
                      config.get("plans"))
    try:
        model.network.load_state_dict(load_state_dict_file(weights_path), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_path}: does not match {config_path} ({err})") from err
    return model.to(device).eval()
