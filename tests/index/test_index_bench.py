"""`streamrecall bench index` at a tiny size: it runs and prints the JSON contract."""

from __future__ import annotations

import json

from click.testing import CliRunner

from streamrecall.bench.index import command


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
