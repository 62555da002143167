"""The README runs as written: every ``dex`` command of its code blocks after the set-up, pasted in order after the
main job, succeeds on phantoms and writes the paths its comments name. The main job's own outputs (``runs/phantoms``,
``runs/medverse``, ``runs/demo-export``) are stood in for by the test collection and a small encoder, and each
command is shortened (fewer epochs, steps and images, appended to its own settings): what is tested is that the
commands, paths and options exist and fit together, not the figures."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import dex
from dex.cli import main
from dex.models import DEXViT

ROOT = Path(__file__).parents[1]
SHORTER = {  # appended after a command's own settings, so that they win over the README's
    "finetune": ["epochs=1", "warmup_epochs=0", "steps_per_epoch=2", "batch_size=4"],
    "pretrain": ["epochs=1", "warmup_epochs=0", "batch_size=8", "samples_per_epoch=16", "log_every=1"],
}
SMALLER_PHANTOMS = ["--per-modality", "4", "--size", "32", "--task-images", "5", "--workers", "1"]


def readme_commands() -> list[tuple[list[list[str]], list[str]]]:
    """The README's ``dex`` commands after the set-up block, in groups: the commands under one comment, with the
    ``runs/...`` paths the comment names."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    groups: list[tuple[list[list[str]], list[str]]] = []
    for block in blocks[1:]:  # the first is the set-up: the main job and the tests
        for line in block.splitlines():
            if line.startswith("#"):
                if not groups or groups[-1][0]:
                    groups.append(([], []))
                groups[-1][1].extend(path.rstrip(".,;:)") for path in re.findall(r"runs/[\w./-]+", line))
            elif line.startswith("dex "):
                groups[-1][0].append(shlex.split(line)[1:])
    return groups


def shortened(argv: list[str]) -> list[str]:
    if argv[:2] == ["data", "make-phantoms"]:
        return argv + SMALLER_PHANTOMS
    if argv[0] in SHORTER:
        return argv + (["--set"] if "--set" not in argv else []) + SHORTER[argv[0]]  # --set is the last option
    return argv


def test_the_readme_names_commands_for_every_step_a_user_takes_after_the_main_job():
    kinds = [argv[0] if argv[0] != "data" else argv[1] for commands, _ in readme_commands() for argv in commands]
    assert {"finetune", "predict", "embed", "pretrain", "curate", "make-phantoms", "vl-eval"} <= set(kinds)


def test_the_readme_commands_run_as_written_and_write_what_they_name(tmp_path, phantom_collection, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "phantoms").symlink_to(phantom_collection / "raw")
    (runs / "medverse").symlink_to(phantom_collection / "curated")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    dex.save_pretrained(DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=4,
                               top_k=2), runs / "demo-export")
    monkeypatch.chdir(tmp_path)
    for commands, named in readme_commands():
        for argv in commands:
            status = main(shortened(argv))
            assert status == 0, f"dex {shlex.join(argv)}: exit status {status}"
        missing = [path for path in named if not (tmp_path / path).exists()]
        assert not missing, f"{[shlex.join(argv) for argv in commands]} did not write {missing}, named in the README"
