"""Reading weight files without unpickling: the one place of the package that calls ``torch.load``.

:func:`load_torch_file` reads a ``torch.save`` file of tensors and plain values (``weights_only=True``) and tells a
file that holds other Python objects (refused, never unpickled) from one whose bytes are not a readable file;
:func:`load_state_dict_file` reads a state dict from a ``.safetensors`` or a torch file.

Why a file was not read is found by reading its pickle stream's opcodes (:mod:`pickletools`, which builds and runs
nothing): torch's weights-only reader stops at the first instruction it does not take, which for a pickle of
protocol 4 or 5 (what ``pickle.dump`` writes by default) is the framing, before it ever sees the object that would
have been built, so its own message ("Unsupported operand 149") does not say why.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch's weights-only unpickler names the class or function it refused
#: The globals a file of weights may name: torch's tensor and storage rebuilders and types, ordered dicts, and the
#: encoder of bytes in protocol 2 (what torch's own weights-only reader takes).
_WEIGHTS_GLOBALS = re.compile(r"(torch\.[\w.]+|collections\.OrderedDict|_codecs\.encode)")


class RefusedFileError(ValueError):
    """A torch file that holds Python objects other than tensors and plain values: it is not unpickled."""

    def __init__(self, path: Path, held: str) -> None:
        self.path, self.held = path, held  # held: the first class or function the file would have unpickled
        super().__init__(f"{path}: refused: it holds Python objects other than tensors ({held}), which the safe "
                         "loader does not build (nothing in it was run); save its state dict alone (or as "
                         ".safetensors)")

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
        with warnings.catch_warnings():  # torch warns of pickle protocols it may not read: the error below says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _unread(path, err) from err


def _unread(path: Path, err: Exception) -> ValueError:
    """Why torch's weights-only reader did not read ``path`` (see the module's docstring): the first object outside
    torch it would have built, else the one torch refused, else the pickle protocol, else unreadable bytes."""
    stream = _pickle_stream(path)
    protocol, names = stream or (None, [])
    foreign = next((name for name in names if not _WEIGHTS_GLOBALS.fullmatch(name)), None)
    refused = _GLOBAL.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if foreign or refused:
        return RefusedFileError(path, foreign or refused.group(1))
    if stream is None or protocol <= 2:
        return ValueError(f"{path}: not a readable PyTorch file, corrupt or cut short ({_detail(err)})")
    return ValueError(f"{path}: a pickle of protocol {protocol}, which the safe loader does not read (it reads "
                      "torch.save files of the default protocol, 2); save the weights with torch.save's defaults "
                      "or as .safetensors")


def _pickle_stream(path: Path) -> tuple[int, list[str]] | None:
    """The protocol of the pickle stream of a file (a ``torch.save`` archive's ``data.pkl``, or the file itself) and
    the globals (``module.name``) it would import, in order, read from its opcodes without building anything; None
    when the bytes are not a pickle stream."""
    data = path.read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if not pickles:
                return None
            data = archive.read(pickles[0])
    protocol, names, strings = 0, [], []  # strings: every string pushed, in order (STACK_GLOBAL takes the last two)
    memo: dict[int, str | None] = {}  # the memo's strings (None: something else was memoised)
    top: str | None = None  # the string the last instruction pushed, if it pushed one
    try:
        for opcode, argument, _ in pickletools.genops(data):
            name = opcode.name
            if name == "PROTO":
                protocol = argument
            elif name == "MEMOIZE" or name.endswith("PUT"):  # the top is memoised and stays on the stack
                memo[len(memo) if name == "MEMOIZE" else argument] = top
            elif name != "FRAME":  # every other instruction leaves a new top
                text = "UNICODE" in name or name.endswith("STRING")
                top = argument if text else memo.get(argument) if name.endswith("GET") else None
                if name in ("GLOBAL", "INST"):
                    names.append(argument.replace(" ", "."))
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                if top is not None:
                    strings.append(top)
    except Exception:  # genops raises many kinds on bytes that are not a pickle stream
        return None
    return protocol, names


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
