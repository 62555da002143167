"""Reading weight files without unpickling: the one place of the package that calls ``torch.load``.

:func:`load_torch_file` reads a ``torch.save`` file of tensors and plain values (``weights_only=True``) and tells a
file that holds other Python objects (refused, never unpickled) from one whose bytes are not a readable file;
:func:`load_state_dict_file` reads a state dict from a ``.safetensors`` or a torch file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch's weights-only unpickler names the class or function it refused


class RefusedFileError(ValueError):
    """A torch file that holds Python objects other than tensors and plain values: it is not unpickled."""

    def __init__(self, path: Path, held: str) -> None:
        self.path, self.held = path, held  # held: the first class or function the file would have unpickled
        super().__init__(f"{path}: refused: it holds Python objects other than tensors ({held}), which are not "
                         "unpickled for safety; save its state dict alone (or as .safetensors)")

    def __reduce__(self):  # rebuilt from its fields when sent between processes, not from its message
        return type(self), (self.path, self.held)


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name the file.

    Raises ``FileNotFoundError`` for a missing file, :class:`RefusedFileError` when the file holds Python objects
    other than tensors and plain values (pickle globals), and ``ValueError`` when its bytes do not read as a torch
    file (corrupt, cut short, another format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        refused = _GLOBAL.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if refused:
            raise RefusedFileError(path, refused.group(1)) from err
        raise ValueError(f"{path}: not a readable PyTorch file, corrupt or cut short ({_detail(err)})") from err


def _detail(err: Exception) -> str:
    """The informative line of a torch error, whose message can span many lines of advice on ``weights_only``."""
    lines = [line.strip() for line in str(err).splitlines()
             if line.strip() and "weights_only" not in line and not line.strip().startswith("Check the documentation")]
    return lines[-1] if lines else type(err).__name__


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with :func:`load_torch_file`. A wrapping dict
    (``model``, ``state_dict``, ``module``) is unwrapped and a DDP ``module.`` prefix removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            obj: Any = safetensors.torch.load_file(str(path))
        except Exception as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    else:
        obj = load_torch_file(path)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}
