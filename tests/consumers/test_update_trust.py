"""The model-update trust model (docs/security.md), without a broker: signatures checked by the one
model-updates decoder, the replica's fencing (stale epochs, version jumps), the start-up scans
counting only verified records, and the signing key kept secret."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch

from streamrecall.consumers.assembly import model_config
from streamrecall.consumers.deadletter import DeadLetterSink
from streamrecall.consumers.handler import decode_value
from streamrecall.consumers.update_chunks import HEADER_SIGNATURE
from streamrecall.consumers.update_codec import ModelUpdateDecoder, decode_model_update, sign_update, update_headers
from streamrecall.consumers.update_scan import _mark
from streamrecall.errors import ConfigError
from streamrecall.events import InvalidEvent
from streamrecall.metrics import RuntimeMetrics
from streamrecall.model import ModelConfig, ModelUpdateRefused, OnlineTrainer, TowerReplica, decode_update
from streamrecall.model.update import ModelUpdate, dense_shapes, encode_update
from streamrecall.settings import Secret, Settings

KEY = Secret("k" * 32)
OTHER_KEY = Secret("o" * 32)
CONFIG = ModelConfig(dim=8, hidden=8, id_buckets=64, token_buckets=64, estimator_buckets=64)
Message = namedtuple("Message", "offset headers value")


def full_update(version: int, trainer_epoch: int = 1) -> bytes:
    model = CONFIG.structural()
    dense = {k: torch.zeros(shape) for k, shape in dense_shapes(model).items()}
    return encode_update(ModelUpdate(version=version, base_version=0, kind="full", dense_changed=True, model=model,
                                     dense=dense, trainer_epoch=trainer_epoch))


def signed(data: bytes, key: Secret = KEY, kind: str = "full", version: int = 1, epoch: int = 1) -> list[Any]:
    return update_headers(kind, version, epoch, sign_update(key, data))


# --- signatures --------------------------------------------------------------------------
def test_a_signed_update_decodes_with_the_key() -> None:
    data = full_update(1)
    update = decode_model_update(data, headers=signed(data), signing_key=KEY)
    assert (update.version, update.trainer_epoch) == (1, 1)


@pytest.mark.parametrize("case", ["unsigned", "empty-signature", "other-key", "tampered", "forged-version"])
def test_unsigned_or_badly_signed_updates_are_refused_with_the_key(case: str) -> None:
    genuine = full_update(1)
    data, headers, reason = genuine, signed(genuine), "bad-signature"
    if case == "unsigned":
        headers, reason = update_headers("full", 1, 1), "unsigned"
    elif case == "empty-signature":
        headers, reason = update_headers("full", 1, 1) + [(HEADER_SIGNATURE, b"")], "unsigned"
    elif case == "other-key":
        headers = signed(genuine, OTHER_KEY)
    elif case == "tampered":  # one bit of the genuine payload flipped, its signature kept
        data = genuine[:-1] + bytes([genuine[-1] ^ 1])
    else:  # a forged version 10^18 carrying the genuine update's signature
        data = full_update(10**18)
    with pytest.raises(InvalidEvent) as info:
        decode_model_update(data, headers=headers, signing_key=KEY)
    assert info.value.reason == reason
    assert KEY.reveal() not in str(info.value)


def test_without_a_key_signatures_are_not_required() -> None:
    data = full_update(1)
    assert decode_model_update(data, headers=update_headers("full", 1)).version == 1


def test_the_runtime_hands_headers_to_the_model_update_decoder() -> None:
    data = full_update(1)
    decode = ModelUpdateDecoder(KEY)
    assert decode_value(decode, data, "model-updates[0]@0", signed(data)).version == 1
    with pytest.raises(InvalidEvent) as info:
        decode_value(decode, data, "model-updates[0]@0", None)
    assert info.value.reason == "unsigned"


def test_scans_mark_only_verified_records_with_a_key() -> None:
    data = full_update(7, trainer_epoch=3)
    good = Message(5, signed(data, version=7, epoch=3), data)
    forged = Message(6, update_headers("full", 7, 3), data)  # same bytes, no signature
    assert _mark(good, KEY).version == 7 and _mark(good, KEY).trainer_epoch == 3
    assert _mark(forged, KEY).version is None and _mark(forged, KEY).kind is None
    assert _mark(forged).version == 7  # without a key the scan cannot tell


# --- fencing -------------------------------------------------------------------------------
def test_an_older_epochs_updates_are_refused_after_a_newer_epoch_applied() -> None:
    old, new = OnlineTrainer(CONFIG), OnlineTrainer(CONFIG)
    replica = TowerReplica(CONFIG)
    assert replica.apply(decode_update(old.export_update(trainer_epoch=1))).status == "applied"
    new.advance_version(old.version)
    assert replica.apply(decode_update(new.export_update(trainer_epoch=2))).status == "applied"
    old.advance_version(new.version)  # the replaced trainer goes on, above the new one's version
    with pytest.raises(ModelUpdateRefused) as info:
        replica.apply(decode_update(old.export_update(full=True, trainer_epoch=1)))
    assert info.value.reason == "stale-epoch"
    assert (replica.version, replica.trainer_epoch) == (2, 2)
    assert replica.apply(decode_update(new.export_update(trainer_epoch=2))).status == "applied"


def test_an_implausible_version_jump_is_refused_and_genuine_updates_still_apply() -> None:
    trainer = OnlineTrainer(CONFIG)
    replica = TowerReplica(CONFIG, max_version_jump=1000)
    assert replica.apply(decode_update(trainer.export_update(trainer_epoch=1))).status == "applied"
    with pytest.raises(ModelUpdateRefused) as info:
        replica.apply(decode_update(full_update(10**18)))
    assert info.value.reason == "version-jump"
    assert replica.apply(decode_update(trainer.export_update(trainer_epoch=1))).status == "applied"
    assert replica.version == 2


def test_a_fresh_replica_takes_its_first_update_at_any_version() -> None:
    replica = TowerReplica(CONFIG, max_version_jump=10)
    assert replica.apply(decode_update(full_update(5000))).status == "applied"


def test_refusals_are_dead_lettered_with_their_reason_and_counted() -> None:
    from prometheus_client import CollectorRegistry

    from streamrecall.consumers.deadletter import DeadLetter

    class Producer:
        def __init__(self) -> None:
            self.sent: list[Any] = []

        def send(self, topic: str, **kwargs: Any) -> None:
            self.sent.append(kwargs)

    registry = CollectorRegistry()
    sink = DeadLetterSink(Producer(), "dl", "publisher", RuntimeMetrics(registry))
    sink.declare(["model-updates"])
    assert registry.get_sample_value("streamrecall_model_updates_refused_total",
                                     {"role": "publisher", "reason": "unsigned"}) == 0
    sink.send(DeadLetter("mu", 0, 3, None, b"x", "unsigned", "no signature"), "model-updates")
    assert registry.get_sample_value("streamrecall_model_updates_refused_total",
                                     {"role": "publisher", "reason": "unsigned"}) == 1


# --- the key is a secret ------------------------------------------------------------------------
def test_the_signing_key_never_prints() -> None:
    settings = Settings(model_signing_key="s3cret-signing-key-0123456789")
    for text in (repr(settings), str(settings.masked()), str(settings.model_signing_key)):
        assert "s3cret" not in text
    assert settings.to_env()["STREAMRECALL_MODEL_SIGNING_KEY"] == "s3cret-signing-key-0123456789"  # children get it
    again = Settings.from_sources({"model_signing_key": settings.model_signing_key})
    assert again.model_signing_key.reveal() == "s3cret-signing-key-0123456789"  # re-wrapping keeps the value


def test_a_short_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="model_signing_key: must be at least 16") as info:
        Settings(model_signing_key="short-key")
    assert "short-key" not in str(info.value)


def test_a_key_in_the_model_table_is_refused_by_name_without_echoing_it() -> None:
    settings = Settings(extra={"model": {"signing_key": "s3cret-signing-key-0123456789"}})
    with pytest.raises(ConfigError, match="model_signing_key") as info:
        model_config(settings)
    assert "s3cret" not in str(info.value)
