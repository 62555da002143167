"""The command line on bad input: one line naming the file, key or value, exit status 2, nothing written; other
failures one line and status 1; a traceback only with --debug."""

from __future__ import annotations

from pathlib import Path

import pytest

import dex.cli.data
from dex.cli import main


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(f"out_dir: {tmp_path / 'run'}\ndata: {tmp_path}\n{text}")
    return str(path)


def _recipe(tmp_path: Path, extra: str) -> str:
    (tmp_path / "videos").mkdir()
    path = tmp_path / "recipe.yaml"
    path.write_text("name: r\nsources:\n  - {name: us, modality: US, root: videos, format: video, "
                    f"normalization: scale_255{extra}}}\n")
    return str(path)


def _suite(tmp_path: Path, encoders: str, tasks: str = "[]") -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(f"out_dir: {tmp_path / 'bench'}\nencoders: {encoders}\ntasks: {tasks}\n")
    return str(path)


def _task(tmp_path: Path) -> str:
    folder = tmp_path / "task"
    (folder / "images").mkdir(parents=True)
    (folder / "task.yaml").write_text("name: t\ntype: segmentaton\nmodality: CT\nclasses: [a, b]\n"
                                      "image_size: [8, 8]\nchannels: 1\n")
    return _suite(tmp_path, "{scratch: scratch}", f"[{folder}]")


# name -> (argv from tmp_path, what the line must say)
CASES = {
    "config value of the wrong type": (lambda t: ["pretrain", _config(t, "epochs: two\n")],
                                       ["run.yaml: epochs: ", "valid integer", "'two'"]),
    "--set value of the wrong type": (lambda t: ["pretrain", _config(t, ""), "--set", "batch_size=eight"],
                                      ["batch_size: ", "'eight'", "--set batch_size=eight"]),
    "--set learning rate": (lambda t: ["pretrain", _config(t, ""), "--set", "base_lr=fast"],
                            ["base_lr: ", "valid number", "'fast'"]),
    "--set unknown key": (lambda t: ["pretrain", _config(t, ""), "--set", "epoch=2"], ["epoch: unknown key"]),
    "--set without =": (lambda t: ["pretrain", _config(t, ""), "--set", "epochs"], ["--set 'epochs'", "KEY=VALUE"]),
    "config that is not a mapping": (lambda t: ["pretrain", _config(t, "- a\n")], ["run.yaml: cannot read"]),
    "missing config": (lambda t: ["pretrain", str(t / "nope.yaml")], ["nope.yaml: no such config file"]),
    "unknown model argument": (lambda t: ["pretrain", _config(t, "model_args: {depht: 2}\n")],
                               ["model_args", "depht"]),
    "recipe value of the wrong type": (lambda t: ["curate", _recipe(t, ", frame_stride: thirty"), "--out",
                                                  str(t / "out")],
                                       ["recipe.yaml: sources[0].frame_stride: ", "'thirty'"]),
    "recipe unknown key": (lambda t: ["curate", _recipe(t, ", colour: red"), "--out", str(t / "out")],
                           ["recipe.yaml: sources[0].colour: unknown key"]),
    "suite with an unknown architecture": (lambda t: ["benchmark", _suite(t, "{a: {model: vit_nope_patch16}}")],
                                           ["suite.yaml: encoder 'a': model 'vit_nope_patch16'", "Unknown model"]),
    "suite with a missing encoder folder": (lambda t: ["benchmark", _suite(t, f"{{a: {t / 'gone'}}}")],
                                            ["suite.yaml: encoder 'a':", "gone: neither an exported encoder"]),
    "task.yaml of a suite": (lambda t: ["benchmark", _task(t)], ["task.yaml: type: input should be 'segmentation'"]),
    "import-task mask value": (lambda t: ["data", "import-task", "pairs", str(t), str(t / "out"), "--modality", "CT",
                                          "--mask-value", "red=foreground"], ["--mask-value 'red=foreground'"]),
    "verify a folder that is not a collection": (lambda t: ["data", "verify", str(t)], ["index.json: missing"]),
    "stats of a folder that is not a collection": (lambda t: ["data", "stats", str(t)], ["no curation journal"]),
    "export of a folder that is not a run": (lambda t: ["export", str(t), str(t / "out")],
                                             ["neither a finished encoder/ nor a checkpoint"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    make_argv, expected = CASES[case]
    argv = make_argv(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"dex {argv[0]}")
    for text in expected:
        assert text in err, (text, err)
    assert {p for p in tmp_path.rglob("*")} == before


def test_other_failures_are_one_line_exit_1_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(dex.cli.data, "_stats", broken)
    assert main(["data", "stats", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "dex data stats: error: RuntimeError: something broke (--debug shows where)\n"
    with pytest.raises(RuntimeError, match="broke"):
        main(["data", "stats", str(tmp_path), "--debug"])
    with pytest.raises(RuntimeError, match="broke"):
        main(["--debug", "data", "stats", str(tmp_path)])
