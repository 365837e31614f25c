"""`load spark` writes what the Python loaders write, and re-running it (or finishing a cut-short run) adds nothing."""
from __future__ import annotations

import gzip
import math

import pytest
from click.testing import CliRunner

from app.cli import DEMO_DATA
from app.cli import main as cli
from app.config import ROOT
from app.ingest import writer

pytest.importorskip("pyspark")

EDGE_STATE = ("MATCH (u:User)-[r:INTERACTED]->(i:Item) "
              "RETURN u.id AS u, i.id AS i, r.w AS w, r.qty AS qty, r.first_ts AS first, r.last_ts AS last, "
              "r.n_purchase AS purchases, r.n_return AS returns")
ITEM_STATE = "MATCH (i:Item) RETURN i.id AS id, i.title AS title, i.price AS price"


def _cli(*args) -> dict:
    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {line.split(":")[0].strip(): int(line.split(":")[1].replace(",", ""))
            for line in result.stdout.splitlines() if ":" in line}


def _state(driver, cfg) -> tuple[dict, dict, dict]:
    with driver.session(database=cfg.neo4j_database) as s:
        edges = {(r["u"], r["i"]): r.data() for r in s.run(EDGE_STATE)}
        items = {r["id"]: r.data() for r in s.run(ITEM_STATE)}
    return edges, items, writer.read_stats(driver, cfg.neo4j_database)


def _same(a: tuple, b: tuple) -> None:
    (edges_a, items_a, stats_a), (edges_b, items_b, stats_b) = a, b
    assert edges_a.keys() == edges_b.keys() and items_a == items_b and stats_a == stats_b
    for key, row in edges_a.items():
        other = edges_b[key]
        # Sums over transactions in another order may differ in the last bits.
        assert math.isclose(row["w"], other["w"], rel_tol=1e-12, abs_tol=1e-12), key
        assert {**row, "w": 0} == {**other, "w": 0}, key


@pytest.fixture(scope="module")
def retail_sample(tmp_path_factory):
    """The first 3,000 rows of the shipped Online Retail copy, and the first 1,400 (a cut-short run)."""
    lines = gzip.open(ROOT / DEMO_DATA, "rt").read().splitlines(keepends=True)
    out = tmp_path_factory.mktemp("spark")
    full, part = out / "retail.csv", out / "retail_part.csv"
    full.write_text("".join(lines[:3001]))
    part.write_text("".join(lines[:1401]))
    return full, part


def test_spark_load_equals_the_python_loader_and_reruns_add_nothing(cfg, clean_db, retail_sample):
    full, part = retail_sample
    python = _cli("load", "online-retail", full, "--chunk-size", 700)
    expected = _state(clean_db, cfg)
    assert python["accepted"] > 1500 and python["dropped missing_user"] > 0

    from tests.conftest import wipe
    wipe(clean_db, cfg.neo4j_database)
    spark = ["load", "spark", "--input", "{}", "--source", "online-retail", "--chunk-size", 700, "--master", "local[2]"]
    # A run cut short (its first two batches landed), then the whole file: every event once.
    first = _cli(*[str(part) if a == "{}" else a for a in spark])
    rest = _cli(*[str(full) if a == "{}" else a for a in spark])
    assert first["accepted"] + rest["accepted"] == python["accepted"]
    assert rest["duplicates"] == python["duplicates"] + first["accepted"]
    assert rest["rows"] == python["rows"] and rest["dropped missing_user"] == python["dropped missing_user"]
    edges, items, _ = _state(clean_db, cfg)
    _same((edges, items, {}), (expected[0], expected[1], {}))
    # The same load again adds nothing.
    again = _cli(*[str(full) if a == "{}" else a for a in spark])
    assert again["accepted"] == 0 and again["duplicates"] == python["accepted"] + python["duplicates"]
    _same((*_state(clean_db, cfg)[:2], {}), (edges, items, {}))


def test_spark_csv_load_takes_the_csv_loaders_flags(cfg, clean_db, tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("user,movie,rating,time\n" + "".join(
        f"u{k % 13},m{k % 17},{1 + k % 5},{1_600_000_000 + 3600 * k}\n" for k in range(400)) + "u1,m1,,oops\n")
    flags = ["--user-col", "user", "--item-col", "movie", "--ts-col", "time", "--ts-unit", "s",
             "--weight-col", "rating", "--chunk-size", 150]
    python = _cli("load", "csv", path, *flags)
    expected = _state(clean_db, cfg)
    from tests.conftest import wipe
    wipe(clean_db, cfg.neo4j_database)
    spark = _cli("load", "spark", "--input", path, *flags, "--master", "local[1]")
    assert spark == python and python["rejected"] == 1
    _same(_state(clean_db, cfg), expected)


def test_spark_load_names_a_missing_column(cfg, tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b,c\n1,2,3\n")
    result = CliRunner().invoke(cli, ["load", "spark", "--input", str(path), "--user-col", "user",
                                      "--item-col", "b", "--ts-col", "c"])
    assert result.exit_code == 1 and "column 'user' not in" in result.output


def test_a_spark_load_leaves_no_jvm_and_no_py4j_connection_behind(cfg, clean_db, tmp_path):
    """Else the connections' finalisers log at interpreter exit, to streams already closed."""
    import gc

    import psutil
    from py4j.clientserver import ClientServerConnection
    from pyspark import SparkContext
    path = tmp_path / "x.csv"
    path.write_text("a,b,c\n1,2,3\n")
    CliRunner().invoke(cli, ["load", "spark", "--input", str(path), "--user-col", "a",
                             "--item-col", "b", "--ts-col", "c", "--master", "local[1]"])
    gc.collect()
    assert SparkContext._gateway is None
    assert not [c for c in gc.get_objects() if isinstance(c, ClientServerConnection) and c.is_connected]
    # Spark's JVM, not another Java child of the suite (a broker a Kafka test restarted)
    assert not [p for p in psutil.Process().children(recursive=True)
                if "java" in p.name() and "spark" in " ".join(p.cmdline()).lower()]
