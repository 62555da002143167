"""The files of a finished collection, made from every part's journals: ``manifest.csv``, ``index.json`` (what the
training loader reads; each shard's sample count, size and SHA-256), ``stats.md`` / ``stats.json`` (the paper's
Table 2 regenerated from what was written) and the private reports; and the check of its shards against the index."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from dex.data.curation.privacy import PRIVATE, private_folder, private_records, write_private_reports
from dex.data.dedup import NearDuplicateIndex
from dex.data.journal import read_journal
from dex.data.readers import Problem
from dex.data.recipe import MODALITIES
from dex.data.shards import INDEX, read_index, shard_problem
from dex.files import write_json

#: Why an image is dropped, with the words stats.md uses.
DROP_LABELS = {"foreground": "too little foreground (volume slices)", "empty": "empty (all zero)",
               "constant": "constant", "small": "smaller than --min-size",
               "near-duplicate": "near-duplicate of a kept image"}
DROP_REASONS = tuple(DROP_LABELS)
MANIFEST_FIELDS = ["key", "source", "modality", "anatomy", "unit", "index", "height", "width", "channels", "bits",
                   "phash", "study", "report_type"]
NORMALIZATION_LABELS = {
    "ct_hu": "(clip(x, [-200, 400]) + 200) / 600", "mr_percentile": "clip(x, [p1, p99]), min-max",
    "pet_raw": "clip(x, [p1, p99]), z-score, min-max", "pet_suv": "clip(x, [0, 20]) / 20",
    "scale_255": "x / 255 (16-bit: x / 65535)",
}


def _read_journals(journals: list[Path]) -> tuple[dict[str, dict[str, Any]], list, list, list, int]:
    """The sources, manifest rows, unit outcomes and committed shards of every part, and the dedup distance."""
    sources: dict[str, dict[str, Any]] = {}
    rows, outcomes, shards = [], [], []
    distance = 0
    for path in journals:
        for record in read_journal(path):
            if record["type"] == "header":
                sources.update({s["name"]: s for s in record["sources"]})
                distance = record["dedup_distance"]
            if record["type"] != "commit":
                continue
            rows += record["rows"]
            outcomes += record["units"]
            if record["shard"]:
                keys = {row["key"] for row in record["rows"]}
                shards.append({"name": record["shard"], "samples": len(keys), "stored": len(keys),
                               "bytes": record["bytes"], "sha256": record["sha256"], "keys": keys})
    return sources, rows, outcomes, shards, distance


def finalize(out: str | Path) -> dict[str, Any]:
    """Merge every part's journals into manifest.csv, index.json, stats.md / stats.json and the private reports
    (paths.csv, dropped.csv, quarantine.csv).

    Near-duplicates across parts (each part deduplicates only its own units) are excluded here, keeping the first
    in part order. A part that is missing or unfinished is refused, by name (:func:`unfinished_parts`).
    """
    out = Path(out)
    journals = sorted(out.glob("journal-*-of-*.jsonl"))
    if not journals:
        raise ValueError(f"{out}: no curation journal found (run dex curate first)")
    unfinished = unfinished_parts(out)
    if unfinished:
        raise ValueError(f"{out}: not merging: {'; '.join(unfinished)} (dex curate RECIPE --out {out} --part I/N "
                         "--resume finishes a part)")
    sources, rows, outcomes, shards, distance = _read_journals(journals)
    private = private_records(out, journals, {o["unit"] for o in outcomes})
    excluded = _cross_part_duplicates(rows, len(journals), distance)
    kept = [r for r in rows if r["key"] not in excluded]
    for shard in shards:
        shard["samples"] -= len(shard.pop("keys") & excluded)
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    stats = _stats(sources, kept, outcomes, len(excluded))
    report_types = Counter(r["report_type"] for r in kept if r.get("report_type"))
    index = {"shards": shards, "samples": len(kept), "exclude": sorted(excluded),
             "modalities": stats["modalities"], **({"report_types": dict(sorted(report_types.items()))}
                                                   if report_types else {})}
    write_json(out / INDEX, index)
    write_json(out / "stats.json", stats)
    (out / "stats.md").write_text(stats_markdown(stats))
    write_private_reports(private_folder(out), private, excluded)
    return stats


def part_journals(out: str | Path) -> dict[int, dict[int, Path]]:
    """The part journals in ``out``: {N: {I: journal-I-of-N.jsonl}} (one N unless splits were mixed)."""
    found: dict[int, dict[int, Path]] = defaultdict(dict)
    for path in Path(out).glob("journal-*-of-*.jsonl"):
        index, _, parts = path.stem.removeprefix("journal-").partition("-of-")
        found[int(parts)][int(index)] = path
    return found


def unfinished_parts(out: str | Path) -> list[str]:
    """What stops the parts in ``out`` from being merged: each part I/N with no journal, or whose journal has no
    ``end`` record (stopped before its last unit), one line each; empty when every part is there and finished."""
    found = part_journals(out)
    if len(found) > 1:
        return [f"journals of different splits ({', '.join(f'N = {n}' for n in sorted(found))})"]
    problems = []
    for parts, journals in found.items():
        for index in range(parts):
            if index not in journals:
                problems.append(f"part {index}/{parts} is missing (no journal-{index}-of-{parts}.jsonl)")
            elif not any(r["type"] == "end" for r in read_journal(journals[index])):
                problems.append(f"part {index}/{parts} is unfinished ({journals[index].name} has no end record)")
    return problems


def verify(out: str | Path) -> tuple[int, list[Problem]]:
    """Check every shard of a finished collection against ``index.json``: there, of its recorded size and SHA-256,
    and no other shard beside it. Returns the number of shards listed and the problems (shard, reason)."""
    out = Path(out)
    shards = read_index(out)["shards"]
    problems = [Problem(shard["name"], problem) for shard in shards
                if (problem := shard_problem(out, shard, check_hash=True))]
    listed = {shard["name"] for shard in shards}
    problems += [Problem(path.name, "not in index.json (left by an unfinished part? run dex data stats)")
                 for path in sorted((out / "shards").glob("*.tar")) if path.name not in listed]
    return len(shards), problems


def _cross_part_duplicates(rows: list[dict[str, Any]], parts: int, distance: int) -> set[str]:
    if parts <= 1:
        return set()
    seen: dict[str, NearDuplicateIndex] = {}
    excluded = set()
    for row in rows:
        index = seen.setdefault(row["source"], NearDuplicateIndex(distance))
        if not index.add(int(row["phash"], 16)):
            excluded.add(row["key"])
    return excluded


def _stats(sources: dict[str, dict[str, Any]], rows, outcomes, cross_part: int) -> dict[str, Any]:
    written = Counter(r["source"] for r in rows)
    dropped: dict[str, Counter] = defaultdict(Counter)
    quarantined = Counter()
    for o in outcomes:
        dropped[o["source"]].update(o["dropped"])
        quarantined[o["source"]] += o["quarantined"]
    per_source = []
    for name, source in sources.items():
        per_source.append({
            "name": name, "modality": source["modality"], "anatomy": source["anatomy"],
            "normalization": source["normalization"], "images": written[name],
            "reported": source.get("reported_count"), "dropped": dict(dropped[name]),
            "quarantined": quarantined[name],
        })
    modalities = Counter(r["modality"] for r in rows)
    by_reason = sum(dropped.values(), Counter())
    if cross_part:
        by_reason["near-duplicate"] += cross_part
    return {"sources": per_source, "modalities": {m: modalities[m] for m in MODALITIES if modalities[m]},
            "total": len(rows), "cross_part_duplicates": cross_part,
            "dropped": {reason: by_reason[reason] for reason in DROP_REASONS if by_reason[reason]},
            "quarantined": sum(quarantined.values())}


def stats_markdown(stats: dict[str, Any]) -> str:
    """Table 2 of the paper, regenerated from what was written, with what was dropped and why."""
    lines = ["# Curated collection", "",
             "| Dataset | Modality | Anatomy | Images (slices) | Paper reports | Normalization | Dropped | Quarantined |",
             "| --- | --- | --- | ---: | ---: | --- | --- | ---: |"]
    for s in stats["sources"]:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "-"
        reported = f"{s['reported']:,}" if s["reported"] is not None else "-"
        lines.append(f"| {s['name']} | {s['modality']} | {s['anatomy']} | {s['images']:,} | {reported} | "
                     f"{NORMALIZATION_LABELS[s['normalization']]} | {dropped} | {s['quarantined']} |")
    lines.append(f"| **Total** | | | **{stats['total']:,}** | | | | |")
    lines += ["", "| Modality | Images |", "| --- | ---: |"]
    lines += [f"| {m} | {n:,} |" for m, n in stats["modalities"].items()]
    lines += ["", "| Dropped because | Images |", "| --- | ---: |"]
    lines += [f"| {DROP_LABELS[reason]} | {n:,} |" for reason, n in stats["dropped"].items()] or ["| (none) | 0 |"]
    lines += [f"| **Files quarantined** (unreadable) | {stats['quarantined']:,} |"]
    if stats["cross_part_duplicates"]:
        lines += ["", f"Near-duplicates across parts excluded at merge: {stats['cross_part_duplicates']}."]
    lines += ["", f"Every dropped image and quarantined file is listed, by path, in `{PRIVATE}/dropped.csv` and "
                  f"`{PRIVATE}/quarantine.csv`: for the curator only; never share `{PRIVATE}/`."]
    return "\n".join(lines) + "\n"
