"""`streamrecall bench index` at a tiny size: it runs and prints the JSON contract."""

from __future__ import annotations

import json

from click.testing import CliRunner

from streamrecall.devtools.bench.index import command


def test_bench_index_json():
    res = CliRunner().invoke(command, ["--items", "600", "--queries", "20", "--random-items", "300", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    by_name = {r["name"]: r for r in rows}
    for name in ("index/upsert", "index/recall_at_10_fresh", "index/recall_at_10_after_churn",
                 "index/query_p99_k100_after_churn", "index/reencode_rebuild_swap", "index/memory_per_item"):
        assert name in by_name
    assert "ratio_to_raw" in by_name["index/upsert"]
    assert all(set(r) <= {"name", "unit", "value", "ratio_to_raw", "extra"} for r in rows)
    assert by_name["index/recall_at_10_fresh"]["value"] >= 0.9


def test_bench_index_compares_like_with_like_and_plots(tmp_path):
    """The re-encode ratio is against raw hnswlib building the same vectors; rows without a raw
    counterpart carry no ratio; --plot writes the recall-against-speed picture."""
    res = CliRunner().invoke(command, ["--items", "600", "--queries", "20", "--random-items", "300", "--json",
                                       "--plot", str(tmp_path)])
    assert res.exit_code == 0, res.output
    by_name = {r["name"]: r for r in json.loads(res.output)}
    assert "ratio_to_raw" in by_name["index/reencode_rebuild_swap"]
    assert "raw hnswlib" not in by_name["index/reencode_in_place"]["extra"]
    assert "ratio_to_raw" not in by_name["index/reencode_in_place"]
    assert "ratio_to_raw" not in by_name["index/raw_add_items"]
    sweep = [r for n, r in by_name.items() if n.startswith("index/queries_per_s_k100_ef")]
    assert len(sweep) == 4 and all("ratio_to_raw" in r for r in sweep)
    png = (tmp_path / "index-recall-vs-qps.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
