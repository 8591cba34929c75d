"""AUTOMATIC1111's prompt styles: styles.csv read as A1111 writes it, applied by its rule ({prompt} or
appended after a comma, in the order named); bad files and unknown names are one line."""

import pytest

from latentforge.errors import FileError
from latentforge.styles import Style, apply_styles, merge, read_styles

CSV = '''name,prompt,negative_prompt,description
cinematic,"cinematic still of {prompt}, film grain","cartoon, drawing",made by hand
sharp,"highly detailed, sharp focus",blurry,
empty,,,
'''


@pytest.fixture
def styles(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("\ufeff" + CSV, encoding="utf-8")  # A1111's editor may write a byte-order mark
    return read_styles(path)


def test_reads_every_column_a1111_writes(styles):
    assert styles["cinematic"] == Style("cinematic", "cinematic still of {prompt}, film grain", "cartoon, drawing")
    assert styles["sharp"] == Style("sharp", "highly detailed, sharp focus", "blurry")
    assert styles["empty"] == Style("empty")


@pytest.mark.parametrize(
    "prompt, style, want",
    [
        ("a cat", "cinematic still of {prompt}, film grain", "cinematic still of a cat, film grain"),
        ("a cat", "sharp focus", "a cat, sharp focus"),
        ("a cat ", " sharp focus", "a cat, sharp focus"),
        ("", "sharp focus", "sharp focus"),
        ("a cat", "", "a cat"),
    ],
)
def test_merge_rule(prompt, style, want):
    assert merge(prompt, style) == want


def test_styles_apply_in_order(styles):
    prompt, negative = apply_styles("a cat", "ugly", styles, ["sharp", "cinematic"])
    assert prompt == "cinematic still of a cat, highly detailed, sharp focus, film grain"
    assert negative == "ugly, blurry, cartoon, drawing"
    with pytest.raises(ValueError, match="unknown style 'nope'; known: cinematic, empty, sharp"):
        apply_styles("a cat", "", styles, ["nope"])


def test_bad_files_are_one_line(tmp_path):
    with pytest.raises(FileError, match="no such file"):
        read_styles(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,negative_prompt\nx,y\n")
    with pytest.raises(FileError, match="no header row with a 'name' column"):
        read_styles(bad)
    bad.write_bytes(b"name,prompt\n\xff\xfe,\n")
    with pytest.raises(FileError, match="not UTF-8"):
        read_styles(bad)
