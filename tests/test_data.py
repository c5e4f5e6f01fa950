"""QA files (rag_jax/data.py): bad text is named by file and line before any batch."""

import json
import re

import pytest

from rag_jax.data import QAFormatError, read_qa


@pytest.mark.parametrize("field", ["question", "answers"])
def test_a_lone_surrogate_is_named_by_file_and_line(tmp_path, field):
    path = tmp_path / "qa.jsonl"
    good = {"question": "who wrote it", "answers": ["Ann"]}
    bad = dict(good, **{field: "who \ud800" if field == "question" else ["\udfff"]})
    # json.dumps writes the lone surrogate as the escape \ud800, which json.loads reads back.
    path.write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    with pytest.raises(QAFormatError, match=rf"^{path}:2: .*lone surrogate"):
        read_qa(path)
    examples, skipped = read_qa(path, skip_bad=True)
    assert (len(examples), skipped) == (2, 1)


def test_a_lone_surrogate_in_a_tsv_answer_is_named(tmp_path):
    path = tmp_path / "qa.tsv"
    path.write_text('who wrote it\t["Ann"]\nwho else\t["\\ud800"]\n')  # JSON escape in a TSV
    expected = (
        f"{path}:2: an answer holds a lone surrogate '\\ud800' at character 0: not Unicode text"
    )
    with pytest.raises(QAFormatError, match=f"^{re.escape(expected)}$"):
        read_qa(path)
