"""The safe weight loader: a file that would build Python objects is refused by name whatever pickle protocol wrote
it, nothing in it runs, and no library warning reaches the user; torch.save files of tensors load."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch

from dex.cli import main
from dex.safeload import RefusedFileError, _pickle_stream, load_state_dict_file, load_torch_file


class Payload:
    """Unpickling it opens ``marker`` for writing, which creates the file: what a malicious weight file would run."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_payload_of_any_protocol_is_refused_by_name_and_never_run(tmp_path, protocol, writer):
    marker, path = tmp_path / "ran", tmp_path / "weights.pt"
    payload = {"pos_embed": torch.zeros(2), "extra": Payload(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
    else:
        torch.save(payload, path, pickle_protocol=protocol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RefusedFileError) as error:
            load_torch_file(path)
    assert str(error.value) == (f"{path}: refused: it holds Python objects other than tensors (io.open), which the "
                                "safe loader does not build (nothing in it was run); save its state dict alone (or "
                                "as .safetensors)")
    assert error.value.held == "io.open" and not caught and not marker.exists()


def test_weights_saved_with_another_protocol_are_named_as_such(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(3)}, path, pickle_protocol=4)
    with pytest.raises(ValueError, match=r"weights.pt: a pickle of protocol 4, which the safe loader does not read"):
        load_state_dict_file(path)
    torch.save({"weight": torch.ones(3)}, path)
    assert torch.equal(load_state_dict_file(path)["weight"], torch.ones(3))
    path.write_bytes(b"not a weight file")
    with pytest.raises(ValueError, match="weights.pt: not a readable PyTorch file, corrupt or cut short"):
        load_torch_file(path)


def test_the_command_line_prints_one_line_and_no_warning(tmp_path, capsys):
    marker, path = tmp_path / "ran", tmp_path / "weights.pth"
    path.write_bytes(pickle.dumps({"extra": Payload(marker)}, protocol=pickle.DEFAULT_PROTOCOL))
    assert main(["embed", f"timm:vit_tiny_patch16_224:{path}", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"dex embed: error: {path}: refused: it holds Python objects other than tensors "
                                "(io.open), which the safe loader does not build (nothing in it was run); save its "
                                "state dict alone (or as .safetensors)"]
    assert not marker.exists()


class System:
    def __reduce__(self):
        return os.system, ("true",)


class Directory:
    def __reduce__(self):
        return os.getcwd, ()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_the_opcode_reader_names_every_global_once_in_order(tmp_path, protocol):
    """From protocol 4 the second global of a module names the module through the memo (a memoised string); a
    memoised dict in between must not be taken for one."""
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps([{"k": 1}, System(), Directory(), System()], protocol=protocol))
    assert _pickle_stream(path) == (protocol, [f"{os.name}.system", f"{os.name}.getcwd"])
    path.write_bytes(b"not a pickle")
    assert _pickle_stream(path) is None
