"""The prequential harness's bookkeeping, on hand-made streams."""

from collections import Counter

from streamrecall.devtools.peers import ItemCFPeer, Popularity, PopularPeer, RecentPopularPeer
from streamrecall.devtools.evaluate import Score, chunks, prepare, score_chunk


def item(i: str, t: int) -> tuple:
    return ("items", i, {"item_id": i, "created_at": t})


def click(u: str, i: str, t: int) -> tuple:
    return ("clicks", u, {"user_id": u, "item_id": i, "ts": t})


def test_hits_recall_tail_and_cold_start_are_counted_per_click():
    events = [item("a", 0), item("b", 0), item("c", 10_000_000)] + [click("x", "a", 1)] * 30 + [click("y", "b", 2)]
    stream = prepare(events)
    popular = PopularPeer()
    popular.observe(events)
    pop = popular.popularity()
    assert pop.head == {"a"}  # the 10% most clicked before the chunk (one of three items, rounded up to 1)
    assert pop.decile == {"a": 0, "b": 3, "c": 6}
    chunk = [click("u", "a", 10_000_100), click("u", "c", 10_000_200), click("v", "b", 10_000_300),
             click("w", "a", 10_000_400)]
    seen = {"w": {"a"}}  # w clicked "a" before: not scored
    tops = {"u": ["a", "b"], "v": ["b"], "w": ["a"]}
    s = Score()
    score_chunk(s, chunk, tops, seen, stream, pop)
    assert (s.scored, s.hits) == (3, 2)
    assert (s.tail_scored, s.tail_hits) == (2, 1)  # c (missed), b (hit)
    assert (s.cold_scored, s.cold_hits) == (1, 0)  # c was created 100 ms before its click
    assert s.recall_n == 2 and s.recall_sum == 0.5 + 1.0
    d = s.as_dict(10)
    assert d["hr_at_k"] == round(2 / 3, 4) and d["k"] == 10 and d["scored_clicks"] == 3
    assert d["hr_by_popularity_decile"][0] == 1.0 and d["hr_by_popularity_decile"][3] == 1.0
    assert d["hr_by_popularity_decile"][6] == 0.0 and d["hr_by_popularity_decile"][1] is None
    assert d["coverage_at_k"] == round(2 / 3, 4)  # a and b filled slots, of three live items
    assert d["head_slot_share"] == round(1 / 3, 4)  # slots of the users scored: u: a, b; v: b


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
    from streamrecall.devtools.peers import OfflinePeer

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
    from streamrecall.devtools.evaluate import parse_options

    assert parse_options(["trainer.batch_size=256", "model.logq=false", "indexer.rescore_factor=1.5",
                          "model.tower=fm"]) == {
        "trainer": {"batch_size": 256}, "model": {"logq": False, "tower": "fm"}, "indexer": {"rescore_factor": 1.5}}
    for bad in ("batch_size=1", "trainer.batch_size", "trainer.x=a b", "model.tower=f-m"):
        with pytest.raises(StreamrecallError):
            parse_options([bad])


def test_head_and_tail_come_from_counts_before_the_chunk_not_the_future():
    early = Popularity.of(Counter({"a": 5}), ["a", "b"] + [f"x{i}" for i in range(8)])
    late = Popularity.of(Counter({"a": 5, "b": 50}), ["a", "b"] + [f"x{i}" for i in range(8)])
    assert early.head == {"a"} and late.head == {"b"}


def test_recent_popular_forgets_clicks_older_than_its_window():
    peer = RecentPopularPeer(window=3)
    peer.observe([click("u", "a", 1), click("u", "a", 2), click("u", "b", 3), click("u", "b", 4), click("u", "c", 5)])
    assert peer.top(2, set()) == ["b", "c"]  # the window holds b, b, c
    assert "a" not in peer.counts
    assert peer.top(3, {"b"}) == ["c"]


def test_item_cf_recommends_what_co_occurs_with_the_users_recent_clicks():
    peer = ItemCFPeer(history=3)
    events = [item(i, 0) for i in "abcdz"]
    for u in range(5):  # everyone who clicks a also clicks b; z is popular on its own
        events += [click(f"p{u}", "a", u), click(f"p{u}", "b", u)]
    events += [click(f"q{u}", "z", 10 + u) for u in range(20)]
    peer.observe(events + [click("me", "a", 100)])
    assert peer.top("me", 2, {"a"})[0] == "b"
    assert peer.top("me", 3, {"a"})[1] == "z", "short lists are filled by popularity"
    assert peer.top("stranger", 1, set()) == ["z"]
