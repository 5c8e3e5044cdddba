"""The evaluation harness runs end to end on a tiny stream (its figures live in docs/model.md)."""

from streamrecall.devtools.bench.model_eval import Variant, evaluate_stream, parse_variant
from streamrecall.devtools.peers import Replay
from streamrecall.model import ModelConfig
from streamrecall.devtools.synthetic import SyntheticConfig


def test_evaluate_stream_scores_every_peer(small_config):
    syn = SyntheticConfig(n_items=300, n_users=100, n_clicks=3_000)
    result = evaluate_stream(syn, {"logq": small_config(), "fm": small_config(tower="fm"),
                                   "replay": Variant(small_config(), Replay(steps=1, capacity=500, batch_size=64))},
                             batch_size=256, k=10, eval_every=2, warmup_batches=2)
    assert set(result.peers) == {"most_popular", "recent_popular", "item_cf", "logq", "fm", "replay"}
    scored = {p["scored_clicks"] for p in result.peers.values()}
    assert len(scored) == 1 and scored.pop() > 0  # the same clicks for everyone
    for peer in result.peers.values():
        assert 0.0 <= peer["hr_at_k"] <= 1.0 and 0.0 <= peer["tail_hr_at_k"] <= 1.0
        assert 0.0 < peer["coverage_at_k"] <= 1.0 and 0.0 <= peer["head_slot_share"] <= 1.0
    assert result.peers["most_popular"]["tail_hr_at_k"] < result.peers["logq"]["tail_hr_at_k"]


def test_variants_parse_config_fields_and_replay_keys():
    name, v = parse_variant("fm_t:tower=fm,temperature=0.2,logq=false,replay_steps=3", ModelConfig())
    assert name == "fm_t" and v.config.tower == "fm" and v.config.temperature == 0.2 and v.config.logq is False
    assert v.replay.steps == 3 and v.replay.capacity == Replay().capacity
