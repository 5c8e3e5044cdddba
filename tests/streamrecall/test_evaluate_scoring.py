"""The prequential harness's bookkeeping, on hand-made streams."""

from streamrecall.evaluate import PopularPeer, Score, chunks, prepare, score_chunk


def item(i: str, t: int) -> tuple:
    return ("items", i, {"item_id": i, "created_at": t})


def click(u: str, i: str, t: int) -> tuple:
    return ("clicks", u, {"user_id": u, "item_id": i, "ts": t})


def test_hits_recall_tail_and_cold_start_are_counted_per_click():
    events = [item("a", 0), item("b", 0), item("c", 10_000_000)] + [click("x", "a", 1)] * 30 + [click("y", "b", 2)]
    stream = prepare(events)
    assert stream.tail == {"b", "c"}  # "a" is the 10% most clicked (one of three items, rounded up to 1)
    chunk = [click("u", "a", 10_000_100), click("u", "c", 10_000_200), click("v", "b", 10_000_300),
             click("w", "a", 10_000_400)]
    seen = {"w": {"a"}}  # w clicked "a" before: not scored
    tops = {"u": ["a", "b"], "v": ["b"], "w": ["a"]}
    s = Score()
    score_chunk(s, chunk, tops, seen, stream)
    assert (s.scored, s.hits) == (3, 2)
    assert (s.tail_scored, s.tail_hits) == (2, 1)  # c (missed), b (hit)
    assert (s.cold_scored, s.cold_hits) == (1, 0)  # c was created 100 ms before its click
    assert s.recall_n == 2 and s.recall_sum == 0.5 + 1.0
    d = s.as_dict(10)
    assert d["hr_at_k"] == round(2 / 3, 4) and d["k"] == 10 and d["scored_clicks"] == 3


def test_most_popular_excludes_seen_and_deleted():
    peer = PopularPeer()
    peer.observe([click("x", "a", 1), click("x", "a", 2), click("y", "b", 3), click("y", "c", 4),
                  ("items", "c", {"item_id": "c", "created_at": 0, "deleted": True})])
    assert peer.top(2, seen=set()) == ["a", "b"]
    assert peer.top(2, seen={"a"}) == ["b"]


def test_chunks_cover_the_stream_after_warmup():
    events = [click("u", str(i), i) for i in range(10)]
    warm, parts = chunks(events, 0.3, 3)
    assert len(warm) == 3 and sum(len(p) for p in parts) == 7 and len(parts) == 3
    assert warm + [e for p in parts for e in p] == events


def test_the_offline_peer_trains_in_the_trainer_batch_size_and_never_returns_seen_items():
    from streamrecall.evaluate import OfflinePeer

    model = {"dim": 8, "hidden": 8, "id_buckets": 256, "token_buckets": 256, "estimator_buckets": 256}
    peer = OfflinePeer(model, batch_size=4)
    items = [("items", f"i{j}", {"item_id": f"i{j}", "created_at": 0, "categories": [f"c{j % 3}"]})
             for j in range(12)]
    peer.observe(items + [click("u", f"i{j % 5}", j) for j in range(10)])
    assert peer.trainer.steps == 3, "two full batches of 4, then the partial one before scoring"
    tops = peer.tops(["u", "new"], 5, {"u": {"i0", "i1"}})
    assert len(tops["u"]) == 5 and not {"i0", "i1"} & set(tops["u"])
    assert len(tops["new"]) == 5


def test_role_options_parse_to_tables_with_typed_values():
    import pytest

    from streamrecall.errors import StreamrecallError
    from streamrecall.evaluate import parse_options

    assert parse_options(["trainer.batch_size=256", "model.logq=false", "indexer.rescore_factor=1.5"]) == {
        "trainer": {"batch_size": 256}, "model": {"logq": False}, "indexer": {"rescore_factor": 1.5}}
    for bad in ("batch_size=1", "trainer.batch_size", "trainer.x=abc"):
        with pytest.raises(StreamrecallError):
            parse_options([bad])
