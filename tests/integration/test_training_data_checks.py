"""The training data is checked before anything is fitted (training/datacheck.py): broken copies of the real files
are refused with one short line per problem naming the file, the column and the lines; clean copies pass."""

from __future__ import annotations

import csv
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, need_data
from training.datacheck import DataError, check, expected

PHONE, HOUSE = ("phone_price", "train.csv"), ("house_prices", "train.csv")


def read_rows(data_dir: Path, parts: tuple[str, str]) -> list[list[str]]:
    with need_data(data_dir, *parts).open(newline="") as handle:
        return list(csv.reader(handle))


def write_rows(folder: Path, parts: tuple[str, str], rows: list[list[str]]) -> Path:
    """A data folder holding ``rows`` as ``parts``; returns the folder."""
    (folder / parts[0]).mkdir(parents=True, exist_ok=True)
    with (folder / parts[0] / parts[1]).open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return folder


def problems(data_dir: Path, model: str = "phone-price") -> list[str]:
    with pytest.raises(DataError) as raised:
        check(model, data_dir)
    lines = str(raised.value).splitlines()
    assert lines == raised.value.problems and all(len(line) <= 200 for line in lines), lines
    return lines


def with_column(rows: list[list[str]], column: str, change) -> list[list[str]]:
    """A copy of ``rows`` with ``change(i, value)`` written into ``column``; i = 0 is the first data row."""
    k = rows[0].index(column)
    return [rows[0]] + [[*r[:k], change(i, r[k]), *r[k + 1 :]] for i, r in enumerate(rows[1:])]


def dropped(rows: list[list[str]], column: str) -> list[list[str]]:
    k = rows[0].index(column)
    return [r[:k] + r[k + 1 :] for r in rows]


@pytest.fixture(scope="module")
def phone(data_dir) -> list[list[str]]:
    return read_rows(data_dir, PHONE)


def test_the_real_files_and_clean_copies_pass(data_dir, phone, tmp_path):
    assert check("phone-price", write_rows(tmp_path, PHONE, phone)) == []
    need_data(data_dir, "poems", "poems_small.txt")
    need_data(data_dir, "fashion_mnist", "train-labels-idx1-ubyte.gz")
    assert check("poem", data_dir, quick=True) == [] and check("fashion", data_dir) == []


def test_a_missing_column(phone, tmp_path):
    (line,) = problems(write_rows(tmp_path, PHONE, dropped(phone, "ram")))
    assert line == "phone_price/train.csv: missing column: ram"


def test_a_text_value_names_the_column_the_line_and_the_value(phone, tmp_path):
    rows = with_column(phone, "ram", lambda i, v: "lots" if i == 4 else v)
    (line,) = problems(write_rows(tmp_path, PHONE, rows))
    assert line == "phone_price/train.csv: ram: not a number in 1 of 1600 rows: line 6 ('lots')"


def test_half_blank_ram_fails_naming_ram_its_first_lines_and_the_count(phone, tmp_path):
    rows = with_column(phone, "ram", lambda i, v: "" if i % 2 else v)
    (line,) = problems(write_rows(tmp_path, PHONE, rows))
    assert line == (
        "phone_price/train.csv: ram: no value in 800 of 1600 rows: lines 3, 5, 7, 9, 11 and 795 more; "
        "the API requires every feature"
    )


def test_no_target_column(phone, tmp_path):
    assert problems(write_rows(tmp_path, PHONE, dropped(phone, "price_range"))) == [
        "phone_price/train.csv: missing column: price_range"
    ]


def test_header_only_and_an_empty_file(phone, tmp_path):
    (line,) = problems(write_rows(tmp_path, PHONE, phone[:1]))
    assert "0 data rows (header only)" in line and "at least 50" in line
    (tmp_path / "phone_price" / "train.csv").write_bytes(b"")
    (line,) = problems(tmp_path)
    assert line.startswith("phone_price/train.csv: is empty (0 bytes)")
    (line,) = problems(write_rows(tmp_path, PHONE, [phone[0], [*phone[1], "9"], *phone[2:]]))
    assert line == "phone_price/train.csv: 1 row(s) with more fields than the header line: line 2"


def test_an_extra_column_training_would_ignore(phone, tmp_path):
    def extra(name: str) -> list[list[str]]:
        return [[*row, name if i == 0 else str(i)] for i, row in enumerate(phone)]

    (line,) = problems(write_rows(tmp_path, PHONE, extra("colour")))
    assert line.startswith("phone_price/train.csv: unknown column colour (training reads the API's features")
    assert check("phone-price", write_rows(tmp_path, PHONE, extra("id"))) == []  # the API's optional id


def test_out_of_range_and_an_absent_class(phone, tmp_path):
    rows = with_column(phone, "battery_power", lambda i, v: "99999" if i == 0 else v)
    (line,) = problems(write_rows(tmp_path, PHONE, rows))
    assert line == "phone_price/train.csv: battery_power: outside 100-20000 in 1 of 1600 rows: line 2 (99999)"
    k = phone[0].index("price_range")
    (line,) = problems(write_rows(tmp_path, PHONE, [r for r in phone if r[k] != "3"]))
    assert "price_range: no row of class 3 (very high cost)" in line


def test_every_problem_is_reported_not_only_the_first(phone, tmp_path):
    rows = with_column(dropped(phone, "wifi"), "ram", lambda i, v: "lots" if i == 0 else v)
    rows = with_column(rows, "price_range", lambda i, v: "" if i == 1 else v)
    found = problems(write_rows(tmp_path, PHONE, rows))
    assert len(found) == 3 and "wifi" in found[0] and "ram" in found[1] and "price_range" in found[2], found


def test_house_missing_values_are_notes_and_text_in_a_number_is_a_problem(data_dir, tmp_path):
    house = read_rows(data_dir, HOUSE)
    shutil.copy(need_data(data_dir, "house_prices", "data_description.txt"), tmp_path / "data_description.txt")

    def folder(rows: list[list[str]]) -> Path:
        write_rows(tmp_path, HOUSE, rows)
        shutil.copy(tmp_path / "data_description.txt", tmp_path / "house_prices")
        return tmp_path

    notes = check("house-price", folder(with_column(house, "LotFrontage", lambda i, v: "NA" if i % 3 else v)))
    (median,) = [note for note in notes if "LotFrontage" in note]
    assert "imputed with the column's median" in median, notes

    rows = with_column(house, "GrLivArea", lambda i, v: "huge" if i in (2, 9) else v)
    (line,) = problems(folder(rows), "house-price")
    assert line == "house_prices/train.csv: GrLivArea: not a number in 2 of 1168 rows: lines 4 ('huge'), 11 ('huge')"
    # training reads only NA as missing: an empty cell is text, which would make the column a category
    (line,) = problems(folder(with_column(house, "LotArea", lambda i, v: "" if i == 0 else v)), "house-price")
    assert line.startswith("house_prices/train.csv: LotArea: not a number in 1 of 1168 rows: line 2 ('')")


def test_fashion_truncated_labels(data_dir, tmp_path):
    labels = need_data(data_dir, "fashion_mnist", "train-labels-idx1-ubyte.gz")
    (tmp_path / "fashion_mnist").mkdir()
    (tmp_path / "fashion_mnist" / "train-images-idx3-ubyte.gz").symlink_to(
        need_data(data_dir, "fashion_mnist", "train-images-idx3-ubyte.gz")
    )
    copy = tmp_path / "fashion_mnist" / labels.name
    copy.write_bytes(labels.read_bytes()[:-1000])  # the gzip stream cut short
    (line,) = problems(tmp_path, "fashion")
    assert line.startswith(f"fashion_mnist/{labels.name}: not a whole gzip file")
    data = gzip.decompress(labels.read_bytes())  # a whole gzip of a file that lost its last 100 labels
    copy.write_bytes(gzip.compress(data[:4] + (59_900).to_bytes(4, "big") + data[8:-100], compresslevel=1))
    assert problems(tmp_path, "fashion") == ["fashion_mnist: 60000 images but 59900 labels"]


def test_poems_too_few_or_not_utf8(tmp_path):
    (tmp_path / "poems").mkdir()
    (tmp_path / "poems" / "poems.txt").write_text("床前明月光\n" * 5, encoding="utf-8")
    assert problems(tmp_path, "poem") == ["poems/poems.txt: 5 poems (non-empty lines); training needs at least 20"]
    (tmp_path / "poems" / "poems.txt").write_bytes("床前明月光\n".encode() * 30 + "疑是地上霜\n".encode("gbk"))
    (line,) = problems(tmp_path, "poem")
    assert line.startswith("poems/poems.txt: not UTF-8 text: line 31")


def test_expected_is_light_and_names_the_files():
    probe = (
        "import sys\nfrom service.catalog import MODELS\nfrom training.datacheck import expected\n"
        "text = '\\n'.join(expected(m.name) for m in MODELS)\nassert 'pandas' not in sys.modules\nprint(text)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("phone_price/train.csv", "house_prices/data_description.txt", "train-labels-idx1-ubyte.gz"):
        assert name in out.stdout
    assert "price_range" in expected("phone-price")


def test_the_training_command_refuses_bad_data_before_fitting(phone, tmp_path):
    """Exit status 2, a few lines naming the column, and no new version (needs training/__main__.py's wiring)."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_rows(data, PHONE, dropped(phone, "ram"))
    out.mkdir()
    command = [sys.executable, "-m", "training", "phone-price", "--quick", "--data-dir", str(data), "--out", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "ram" in run.stderr and "Traceback" not in run.stderr and len(run.stderr.splitlines()) <= 8, run.stderr
    assert list(out.iterdir()) == []


BROKEN = {  # what a user's CSV gets wrong, and the words the one message must hold
    "a missing column": (lambda rows: dropped(rows, "ram"), ["ram"]),
    "a text value": (lambda rows: with_column(rows, "ram", lambda i, v: "lots" if i == 4 else v), ["ram", "line 6"]),
    "no target column": (lambda rows: dropped(rows, "price_range"), ["price_range"]),
    "a header only": (lambda rows: rows[:1], ["rows"]),
    "an empty file": (lambda rows: [], ["empty"]),
    "every second ram blank": (lambda rows: with_column(rows, "ram", lambda i, v: "" if i % 2 else v), ["ram"]),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_each_broken_file_stops_the_command_in_a_few_lines(phone, tmp_path, capsys, case):
    from training.__main__ import main

    change, words = BROKEN[case]
    data, out = tmp_path / "data", tmp_path / "out"
    write_rows(data, PHONE, change(phone))
    with pytest.raises(SystemExit) as stopped:
        main(["phone-price", "--data-dir", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.splitlines()) <= 4, err
    assert all(word in err for word in words), err
    assert not out.exists() or list(out.iterdir()) == []
