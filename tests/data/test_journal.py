"""Journals of batch jobs: a line cut by a kill is not a commit, and a resumed job's records are not lost after it."""

from __future__ import annotations

from dex.data.journal import append_record, read_journal


def test_a_resumed_job_keeps_what_it_appends_after_a_cut_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    append_record(path, {"commit": 1})
    with open(path, "a") as handle:
        handle.write('{"commit": 2, "rows": [1, 2')  # the kill came in the middle of this write
    before = path.read_bytes()
    assert read_journal(path) == [{"commit": 1}]
    assert path.read_bytes() == before  # a reader that is not the resuming job changes nothing
    assert read_journal(path, repair=True) == [{"commit": 1}]
    append_record(path, {"commit": 3})
    assert read_journal(path) == [{"commit": 1}, {"commit": 3}]


def test_a_record_whose_newline_was_cut_is_not_committed(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"commit": 1}\n{"commit": 2}')
    assert read_journal(path, repair=True) == [{"commit": 1}]
    assert path.read_text() == '{"commit": 1}\n'
    assert read_journal(tmp_path / "missing.jsonl") == []
