import pytest

from streamrecall.model import ModelConfig, ModelConfigError


@pytest.mark.parametrize("field, value", [
    ("dim", 0), ("id_buckets", -1), ("temperature", 0.0), ("p_min", 1.5), ("estimator_alpha", 1.0),
    ("mixed_negatives", -2), ("downsample_top", 2.0), ("dense_optimizer", "sgd"), ("logq", "yes"),
    ("lr_sparse", float("nan")), ("sparse_optimizer", "adam"), ("logq_alpha", -0.5),
    ("estimator_prior_gaps", float("inf")),
])
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ModelConfigError) as err:
        ModelConfig(**{field: value})
    assert err.value.field == field and field in str(err.value)


def test_defaults_and_round_trip():
    c = ModelConfig()
    assert (c.dim, c.id_buckets, c.history_len, c.logq, c.mixed_negatives, c.downsample_top) == \
        (64, 1_000_000, 20, True, 0, None)
    # Chosen by bench model-eval (docs/model.md): the prior on, the full correction.
    assert (c.estimator_prior_gaps, c.logq_alpha) == (1.0, 1.0)
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ModelConfigError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})
