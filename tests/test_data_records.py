"""Records and JSONL files: every error names the file and line (or row) and the field."""

from __future__ import annotations

import json

import pytest

from lightning_sd.data.records import DataError, load_jsonl, save_jsonl, validate_records


def write(tmp_path, content: bytes | str, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_load_ok_with_bom_crlf_and_trailing_blank_lines(tmp_path):
    path = write(tmp_path, b'\xef\xbb\xbf{"prompt": "a", "answer": 3}\r\n{"prompt": "b", "id": "x"}\n\n\n')
    recs = load_jsonl(path)
    assert [r["prompt"] for r in recs] == ["a", "b"]
    assert recs[0]["id"] == "data.jsonl:1" and recs[1]["id"] == "x"
    assert recs[0]["answer"] == 3


def test_non_utf8_names_line_and_suggests_reencoding(tmp_path):
    path = write(tmp_path, '{"prompt": "ok"}\n'.encode() + '{"prompt": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"data\.jsonl:2: not valid UTF-8.*re-encode"):
        load_jsonl(path)


def test_blank_line_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, '{"prompt": "a"}\n   \n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: blank line.*skip_blank=True"):
        load_jsonl(path)
    assert len(load_jsonl(path, skip_blank=True)) == 2


def test_invalid_json_names_line_and_json_message(tmp_path):
    path = write(tmp_path, '{"prompt": "a"}\n{"prompt": "b",}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: invalid JSON: Expecting property name.*column"):
        load_jsonl(path)


def test_non_object_line(tmp_path):
    path = write(tmp_path, '["prompt", "a"]\n')
    with pytest.raises(DataError, match=r"data\.jsonl:1: expected a JSON object.*got list"):
        load_jsonl(path)


@pytest.mark.parametrize("line, message", [
    ('{"question": "a"}', r"data\.jsonl:1: missing required field 'prompt'.*keys present: \['question'\]"),
    ('{"prompt": null}', r"data\.jsonl:1: missing required field 'prompt'"),
    ('{"prompt": "  "}', r"data\.jsonl:1: field 'prompt' is empty; fill it in or drop"),
    ('{"prompt": 7}', r"data\.jsonl:1: field 'prompt' must be a string, got int"),
    ('{"prompt": "a", "answer": [1]}', r"data\.jsonl:1: field 'answer' must be a string or a number"),
])
def test_bad_fields_name_field_and_line(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        load_jsonl(write(tmp_path, line + "\n"))


def test_custom_required_fields(tmp_path):
    path = write(tmp_path, '{"prompt": "a", "solution": ""}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'solution' is empty"):
        load_jsonl(path, required=("prompt", "solution"), nonempty=("prompt", "solution"))
    with pytest.raises(DataError, match=r"data\.jsonl:1: missing required field 'answer'"):
        load_jsonl(path, required=("prompt", "answer"))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="has no records"):
        load_jsonl(write(tmp_path, "\n"))


def test_validate_records_names_row_and_field():
    with pytest.raises(DataError, match=r"my data row 1: missing required field 'prompt'"):
        validate_records([{"prompt": "a"}, {"text": "b"}], source="my data")
    with pytest.raises(DataError, match=r"records row 0: field 'solution' is empty"):
        validate_records([{"prompt": "a", "solution": ""}], required=("prompt", "solution"))
    with pytest.raises(DataError, match=r"records row 0: expected a JSON object"):
        validate_records(["just a string"])
    with pytest.raises(DataError, match="no records"):
        validate_records([])
    assert validate_records(iter([{"prompt": "a"}])) == [{"prompt": "a"}]


def test_save_load_round_trip_keeps_unicode_and_extra_fields(tmp_path):
    recs = [{"prompt": "Ünïcode ✓\nnew line", "solution": "s", "answer": "1", "id": "a", "meta": {"k": [1, 2]}},
            {"prompt": "line\u2028separator", "id": "b"}]
    path = save_jsonl(recs, tmp_path / "sub" / "out.jsonl")
    assert load_jsonl(path) == recs
    assert "✓" in path.read_text(encoding="utf-8")
    assert len(path.read_bytes().split(b"\n")) == 3 and json.loads(path.read_text().splitlines()[0])["id"] == "a"
