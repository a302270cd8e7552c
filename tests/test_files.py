"""files.jsonl_objects: the one reader of users' JSON-lines files, used by every pipeline's data step."""

from __future__ import annotations

import pytest

from modelmake.errors import RecordError
from modelmake.files import jsonl_objects


@pytest.mark.parametrize("line, error", [
    (b"{not json\n", "not JSON"),
    (b"\xff\xfe\n", "not UTF-8"),
    (b"[1, 2]\n", "expected a JSON object, got list"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, error):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a"}\n\n' + line)
    with pytest.raises(RecordError, match=rf"in\.jsonl:3: {error}"):
        list(jsonl_objects(path))


def test_blank_lines_are_skipped_and_lines_keep_their_numbers(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a"}\n\n  \n{"id": "b"}\n', encoding="utf-8")
    assert [(w.rsplit(":", 1)[1], o["id"]) for w, o in jsonl_objects(path)] == [("1", "a"), ("4", "b")]
