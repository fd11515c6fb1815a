"""Data step: verified download, validated three-class table, splits and table 5."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import polars as pl
import pytest

from synthpert.cli import main as cli_main
from synthpert.errors import CommandError
from synthpert.steps import fetch as download
from synthpert.steps import prepare as data

DEMO = Path(__file__).resolve().parents[1] / "data" / "perturbqa-demo"
PAPER_TABLE5 = {
    "Direction of change": {"K562": 19980, "RPE1": 26652, "HepG2": 17860, "Jurkat": 20058, "Total": 84550},
    "Differential expression": {"K562": 157679, "RPE1": 187089, "HepG2": 126889, "Jurkat": 142822, "Total": 614479},
}


def sums(folder: Path) -> dict[str, str]:
    return {name: sha for sha, name in (line.split() for line in (folder / "SHA256SUMS").read_text().splitlines())}


# --- fetch -------------------------------------------------------------------------


def test_fetch_local_verifies_and_writes(tmp_path):
    out = tmp_path / "k562-de.csv"
    download.fetch(str(DEMO), "k562-de.csv", sums(DEMO)["k562-de.csv"], out)
    assert out.read_bytes() == (DEMO / "k562-de.csv").read_bytes()


def test_fetch_corrupt_file_names_file_and_checksums(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = (DEMO / "k562-de.csv").read_bytes()
    (src / "k562-de.csv").write_bytes(good.replace(b",0,", b",1,", 1))
    out = tmp_path / "out" / "k562-de.csv"
    expected = sums(DEMO)["k562-de.csv"]
    with pytest.raises(CommandError) as err:
        download.fetch(str(src), "k562-de.csv", expected, out)
    msg = str(err.value)
    assert "k562-de.csv" in msg and expected in msg
    assert download.sha256_file(src / "k562-de.csv") in msg
    assert not out.exists() and not list(out.parent.iterdir())


def test_fetch_missing_file(tmp_path):
    with pytest.raises(CommandError, match=r"rpe1-dir\.csv: not found"):
        download.fetch(str(tmp_path), "rpe1-dir.csv", "0" * 64, tmp_path / "out" / "rpe1-dir.csv")
    assert not (tmp_path / "out" / "rpe1-dir.csv").exists()


class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate = False

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        body = source.read()
        outputfile.write(body[: len(body) // 2] if self.truncate else body)


@pytest.fixture
def http_source(tmp_path):
    """A real HTTP server on 127.0.0.1 serving the demo files."""
    root = tmp_path / "www"
    shutil.copytree(DEMO, root)
    servers = []

    def start(truncate: bool = False) -> str:
        handler = type("H", (_Handler,), {"truncate": truncate})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_fetch_http(tmp_path, http_source):
    out = tmp_path / "out" / "hepg2-dir.csv"
    download.fetch(http_source(), "hepg2-dir.csv", sums(DEMO)["hepg2-dir.csv"], out)
    assert out.read_bytes() == (DEMO / "hepg2-dir.csv").read_bytes()


def test_fetch_http_truncated(tmp_path, http_source):
    out = tmp_path / "out" / "hepg2-de.csv"
    with pytest.raises(CommandError, match=r"hepg2-de\.csv: truncated download"):
        download.fetch(http_source(truncate=True), "hepg2-de.csv", sums(DEMO)["hepg2-de.csv"], out)
    assert not list(out.parent.iterdir())


def test_fetch_http_404(tmp_path, http_source):
    with pytest.raises(CommandError, match=r"nope-de\.csv: HTTP 404"):
        download.fetch(http_source(), "nope-de.csv", "0" * 64, tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


# --- prepare -------------------------------------------------------------------------


def write_pair(folder: Path, de_rows: str, dir_rows: str, cell: str = "k562") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{cell}-de.csv").write_text("pert,gene,label,split\n" + de_rows)
    (folder / f"{cell}-dir.csv").write_text("pert,gene,label,split\n" + dir_rows)


def test_three_class_convention(tmp_path):
    write_pair(tmp_path, "A,x,0,train\nA,y,1,train\nA,z,1,test\n", "A,y,0,train\nA,z,1,test\n")
    df = data.build_cell("k562", tmp_path / "k562-de.csv", tmp_path / "k562-dir.csv")
    assert dict(zip(df["gene"], df["label"], strict=True)) == {"x": 0, "y": 1, "z": 2}
    assert df.columns == ["cell", "pert", "gene", "de", "direction", "label", "split"]


@pytest.mark.parametrize(
    ("de_rows", "dir_rows", "bad_file", "message", "shown"),
    [
        ("A,x,0,train\nA,y,1,train\n", "A,y,1,train\nA,x,0,train\n", "dir", "direction rows outside the DE pairs", "x"),
        ("A,x,0,train\nA,y,1,train\nA,w,1,train\n", "A,y,1,train\n", "dir", "DE pairs of k562-de.csv without a direction", "w"),
        ("A,x,0,train\nA,x,1,train\n", "A,x,1,train\n", "de", "duplicate (pert, gene) pairs", "x"),
        ("A,x,2,train\n", "", "de", "labels outside {0, 1}", "x"),
        ("A,x,0,validation\n", "", "de", "split values outside", "validation"),
        ("A,x,0,train\nA,y,1,train\n", "A,y,1,test\n", "dir", "split differs from k562-de.csv", "y"),
    ],
)
def test_inconsistent_inputs_are_named(tmp_path, de_rows, dir_rows, bad_file, message, shown):
    write_pair(tmp_path, de_rows, dir_rows)
    with pytest.raises(CommandError) as err:
        data.build_cell("k562", tmp_path / "k562-de.csv", tmp_path / "k562-dir.csv")
    msg = str(err.value)
    assert f"k562-{bad_file}.csv" in msg and message in msg and shown in msg


def test_wrong_column_is_named(tmp_path):
    (tmp_path / "k562-de.csv").write_text("pert,target,label,split\nA,x,0,train\n")
    (tmp_path / "k562-dir.csv").write_text("pert,gene,label,split\n")
    with pytest.raises(CommandError, match=r"k562-de\.csv: missing column\(s\) \['gene'\]"):
        data.build_cell("k562", tmp_path / "k562-de.csv", tmp_path / "k562-dir.csv")


def test_non_integer_label(tmp_path):
    write_pair(tmp_path, "A,x,yes,train\n", "")
    with pytest.raises(CommandError, match=r"k562-de\.csv: column 'label' must hold integers"):
        data.build_cell("k562", tmp_path / "k562-de.csv", tmp_path / "k562-dir.csv")


def test_prepare_cli_leaves_no_output_on_bad_input(tmp_path, capsys):
    src = tmp_path / "in"
    shutil.copytree(DEMO, src)
    lines = (src / "rpe1-dir.csv").read_text().splitlines()
    (src / "rpe1-dir.csv").write_text("\n".join(lines[:-3]) + "\n")  # DE pairs lose their direction
    out = tmp_path / "out"
    rc = cli_main(
        ["prepare", "--input-dir", str(src), "--cells", "k562", "rpe1", "--holdout", "rpe1",
         "--tuples", str(out / "tuples.parquet"), "--splits-dir", str(out / "splits"), "--table5", str(out / "t5.csv")]
    )
    assert rc == 1
    assert "rpe1-dir.csv: DE pairs of rpe1-de.csv without a direction" in capsys.readouterr().err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_splits_default_and_holdout():
    tuples = data.build_tuples(DEMO, ["k562", "rpe1", "hepg2", "jurkat"])
    default = data.make_split(tuples, "default")
    assert (default["role"] == default["split"]).all()
    hold = data.make_split(tuples, "rpe1_holdout")
    assert set(hold.filter(pl.col("cell") == "rpe1")["role"]) == {"test"}
    assert set(hold.filter(pl.col("cell") != "rpe1")["role"]) == {"train"}
    general = data.make_split(tuples, "jurkat_holdout")  # any configured cell works
    assert general.filter(pl.col("role") == "test")["cell"].unique().to_list() == ["jurkat"]
    with pytest.raises(CommandError, match="unknown split"):
        data.make_split(tuples, "random")


def test_any_cell_line_id_but_a_safe_one():
    with pytest.raises(CommandError, match=r"cell line id\(s\) \['HeLa'\]: expected lower-case"):
        data.build_tuples(DEMO, ["k562", "HeLa"])
    with pytest.raises(CommandError, match=r"hela-de.csv: file not found"):  # a new id is welcome; its files must exist
        data.build_tuples(DEMO, ["k562", "hela"])


def test_table5_full_data_matches_paper(shared_perturbqa):
    tuples = data.build_tuples(shared_perturbqa, ["k562", "rpe1", "hepg2", "jurkat"])
    table = data.table5(tuples)
    assert {row.pop("task"): row for row in table.to_dicts()} == PAPER_TABLE5
