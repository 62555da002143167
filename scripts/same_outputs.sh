#!/usr/bin/env bash
# Behaviour unchanged across a restructuring: run the README's main job and the commands after it (plus short
# M-IDoL and MedMoE runs on DEX backbones, a fine-tune, predictions on NIfTI and DICOM, embeddings) with the code of
# CODE_DIR into WORK_DIR, and write WORK_DIR/hashes.txt: the SHA-256 of every file written, with the fields and files
# that carry times or paths left out (TensorBoard events, logs', records' and model cards' timings, the feature
# cache's names). HASH_ONLY=1 hashes what WORK_DIR holds without running anything.
# Two checkouts compared (the second reusing the first's curation salts, so their shards can be equal):
#   git worktree add /tmp/before <old commit>
#   scripts/same_outputs.sh /tmp/before /tmp/run-before
#   scripts/same_outputs.sh "$PWD" /tmp/run-after /tmp/run-before
#   diff /tmp/run-before/hashes.txt /tmp/run-after/hashes.txt
set -euo pipefail
CODE=$(cd "$1" && pwd); WORK=$2; SALTS=${3:-}
PY=${PYTHON:-python}
mkdir -p "$WORK" && cd "$WORK"
export PYTHONPATH=$CODE
dex() { echo "== dex $*"; "$PY" -m dex "$@"; }
if [ -z "${HASH_ONLY:-}" ]; then
dex data make-phantoms runs/phantoms
for collection in medverse pairs; do
  if [ -n "$SALTS" ]; then
    mkdir -p -m 700 "runs/$collection/private"
    cp "$SALTS/runs/$collection/private/salt.txt" "runs/$collection/private/"
  fi
done
dex curate runs/phantoms/recipe.yaml --out runs/medverse
dex curate runs/phantoms/recipe-pairs.yaml --out runs/pairs
dex pretrain "$CODE/configs/pretrain_demo.yaml"
dex export runs/demo runs/demo-export
dex pretrain "$CODE/configs/pretrain_midol_tiny_cpu.yaml" --set data=runs/medverse epochs=1 warmup_epochs=1 \
  out_dir=runs/midol-dex model_args.num_experts=8 model_args.top_k=2
dex pretrain "$CODE/configs/pretrain_medmoe_dex_tiny_cpu.yaml" --set data=runs/pairs epochs=1 warmup_epochs=1 \
  out_dir=runs/medmoe-dex
dex finetune runs/demo-export runs/phantoms/tasks/ct-organs --out runs/ct-model --set epochs=2 warmup_epochs=1
dex predict runs/ct-model runs/phantoms/sources/ct-nifti/case_0000.nii.gz runs/phantoms/sources/ct-dicom/case_0000 \
  --out runs/ct-predictions
dex predict runs/ct-model runs/phantoms/tasks/ct-organs --out runs/ct-test
dex embed runs/demo-export runs/phantoms/tasks/photo-lesion-type/images --out runs/lesion-features
dex benchmark "$CODE/configs/benchmark_embedded.yaml"
fi
"$PY" - <<'HASH' > hashes.txt
import hashlib, json, re
from pathlib import Path

TIMINGS = ("images_per_s", "seconds", "fit_seconds", "feature_seconds")
for path in sorted(Path("runs").rglob("*")):
    if not path.is_file() or "tensorboard" in path.parts or "features" in path.parts or path.suffix == ".log":
        continue
    data = path.read_bytes()
    if path.name == "log.jsonl" or (path.suffix == ".json" and "runs" in path.parts[2:]):
        rows = [json.loads(line) for line in data.decode().splitlines()] if path.suffix == ".jsonl" else json.loads(data)
        for row in rows if isinstance(rows, list) else [rows]:
            for key in TIMINGS:
                row.pop(key, None)
        data = json.dumps(rows, sort_keys=True).encode()
    elif path.name == "README.md":  # a model card names the seconds its training took
        data = re.sub(rb"; \d+ s\n", b"\n", data)
    print(hashlib.sha256(data).hexdigest(), path)
HASH
echo "hashes of $(wc -l < hashes.txt) files: $WORK/hashes.txt"
