"""MedVerse curation (App. C.1.1, Table 2): raw sources -> normalised 2D images in WebDataset tar shards.

Workers turn *units* (:mod:`~dex.data.curation.units`: a file, or a DICOM folder) into samples; the main process
keeps them in order, drops near-duplicates within each source, and writes shards committed by the part's journals
(:mod:`~dex.data.curation.run`: a killed run resumes from them). ``finalize`` (run by ``dex curate`` at the end and by
``dex data stats``) reads every part's journals and writes the collection's files (:mod:`~dex.data.curation.collection`:
``manifest.csv``, ``index.json``, ``stats.md`` / ``stats.json``); ``verify`` checks its shards.

Nothing in the collection names a source file (:mod:`~dex.data.curation.privacy`): a sample carries its recipe source
and a salted hash of its unit's path (``unit``), and its key is a salted hash too. What names files by path, for the
curator only, lives in ``private/``: the salt, the part's private journal (each committed unit's path, the path of
every image written, dropped or quarantined), and the reports ``finalize`` makes from it (``paths.csv``,
``dropped.csv``, ``quarantine.csv``) and ``curate.log``.
"""

from dex.data.curation.collection import (
    DROP_LABELS,
    DROP_REASONS,
    finalize,
    part_journals,
    stats_markdown,
    unfinished_parts,
    verify,
)
from dex.data.curation.privacy import PRIVATE, private_folder, private_log
from dex.data.curation.run import CurateSummary, curate
from dex.data.curation.units import CurateOptions, Unit, discover_units

__all__ = ["DROP_LABELS", "DROP_REASONS", "PRIVATE", "CurateOptions", "CurateSummary", "Unit", "curate",
           "discover_units", "finalize", "part_journals", "private_folder", "private_log", "stats_markdown", "unfinished_parts",
           "verify"]
