"""The evaluation harness runs end to end on a tiny stream (its figures live in docs/model.md)."""

from streamrecall.bench.model_eval import evaluate_stream
from streamrecall.synthetic import SyntheticConfig


def test_evaluate_stream_scores_every_peer(small_config):
    syn = SyntheticConfig(n_items=300, n_users=100, n_clicks=3_000)
    result = evaluate_stream(syn, {"logq": small_config(), "mixed": small_config(mixed_negatives=32)},
                             batch_size=256, k=10, eval_every=2, warmup_batches=2)
    assert set(result.peers) == {"most_popular", "logq", "mixed"}
    for peer in result.peers.values():
        assert peer["scored"] > 0 and 0.0 <= peer["hr"] <= 1.0 and 0.0 <= peer["tail_hr"] <= 1.0
