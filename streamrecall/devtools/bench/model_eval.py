"""`streamrecall bench model-eval`: prequential HR@K of every recommender, offline, no broker.

The protocol of `streamrecall evaluate` (streamrecall/devtools/evaluate.py) without the live system, so a
sweep of model variants runs in seconds to minutes: the stream is read once, in chunks of
``batch_size`` clicks; every ``eval_every``-th chunk after ``warmup_batches`` is first scored —
each of its users gets a top K by each recommender, items the user clicked before excluded, and a
click is a hit when its item is in that list — and only then fed to everyone. Each model trains
one step per chunk, in order, exactly as the offline peer of `evaluate`. Head and tail come from
click counts *before* each chunk (the head: the 10% most clicked live items so far); every
recommender reports HR@K, tail HR@K, HR by popularity decile, coverage@K and head slot share.

Recommenders: ``most_popular``, ``recent_popular`` (last 5,000 clicks), ``item_cf`` (item-to-item
co-occurrence over each user's last 10 clicks), and the models: ``logq`` (the default model),
``no_logq`` (it with ``logq=False``), the other model family by name (``two_tower`` when the default
is the FM, ``fm`` otherwise), ``logq_mixed`` with ``--mixed-negatives``,
and any ``--variant NAME:key=value,...`` (ModelConfig fields, plus ``replay_steps``,
``replay_capacity``, ``replay_half_life``, ``replay_batch`` for replay after every step).
"""

from __future__ import annotations

import time
import typing
from dataclasses import dataclass, field
from typing import Any

import click
import torch

from streamrecall.devtools.bench import json_option, report, result
from streamrecall.devtools.peers import RECENT_WINDOW, TOWERS, Event, ItemCFPeer, OfflinePeer, PopularPeer, RecentPopularPeer, Replay
from streamrecall.devtools.evaluate import Score, prepare, score_chunk
from streamrecall.model import ModelConfig
from streamrecall.devtools.synthetic import SyntheticConfig, generate

#: Variant keys that set replay rather than a ModelConfig field.
_REPLAY_KEYS = {"replay_steps": "steps", "replay_capacity": "capacity", "replay_half_life": "half_life",
                "replay_batch": "batch_size"}


@dataclass(frozen=True)
class Variant:
    """A model peer: its config and its replay (none by default)."""

    config: ModelConfig
    replay: Replay = Replay()


@dataclass
class EvalResult:
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    train_examples_per_s: float = 0.0


def evaluate_stream(syn: SyntheticConfig, models: dict[str, ModelConfig | Variant], *, batch_size: int = 1024,
                    k: int = 50, eval_every: int = 5, warmup_batches: int = 20) -> EvalResult:
    """Score every recommender on ``syn`` prequentially (module docstring); ``models`` by peer name."""
    variants = {n: m if isinstance(m, Variant) else Variant(m) for n, m in models.items()}
    stream = prepare(generate(syn))
    started = time.perf_counter()
    popular, recent, item_cf = PopularPeer(), RecentPopularPeer(RECENT_WINDOW), ItemCFPeer()
    offline = {n: OfflinePeer(v.config.to_dict(), batch_size, v.replay) for n, v in variants.items()}
    scores = {name: Score() for name in ("most_popular", "recent_popular", "item_cf", *variants)}
    seen: dict[str, set[str]] = {}
    n_chunks = 0
    for chunk in _chunks(stream.events, batch_size):
        if n_chunks >= warmup_batches and n_chunks % eval_every == 0:
            users = sorted({v["user_id"] for t, _, v in chunk if t == "clicks"})
            none: set[str] = set()
            tops = {"most_popular": {u: popular.top(k, seen.get(u, none)) for u in users},
                    "recent_popular": {u: recent.top(k, seen.get(u, none)) for u in users},
                    "item_cf": {u: item_cf.top(u, k, seen.get(u, none)) for u in users}}
            tops |= {n: peer.tops(users, k, seen) for n, peer in offline.items()}
            pop = popular.popularity()
            for name, t in tops.items():
                score_chunk(scores[name], chunk, t, seen, stream, pop)
        for peer in (popular, recent, item_cf, *offline.values()):
            peer.observe(chunk)
        for topic, _, v in chunk:
            if topic == "clicks":
                seen.setdefault(v["user_id"], set()).add(v["item_id"])
        n_chunks += 1
    clicks = sum(1 for t, _, _ in stream.events if t == "clicks")
    train_s = sum(p.train_seconds for p in offline.values())
    return EvalResult({n: s.as_dict(k) for n, s in scores.items()}, time.perf_counter() - started,
                      clicks * len(offline) / max(train_s, 1e-9))


def _chunks(events: list[Event], clicks_per_chunk: int) -> typing.Iterator[list[Event]]:
    chunk: list[Event] = []
    n = 0
    for event in events:
        chunk.append(event)
        if event[0] == "clicks":
            n += 1
            if n == clicks_per_chunk:
                yield chunk
                chunk, n = [], 0
    if chunk:
        yield chunk


def parse_variant(spec: str, base: ModelConfig) -> tuple[str, Variant]:
    """``"fm_t02:tower=fm,temperature=0.2"`` → ("fm_t02", Variant(base with those fields))."""
    name, sep, body = spec.partition(":")
    if not name or not sep:
        raise click.BadParameter(f"{spec!r}: expected NAME:key=value[,key=value...]", param_hint="--variant")
    types = typing.get_type_hints(ModelConfig)
    changes: dict[str, Any] = {}
    replay: dict[str, Any] = {}
    for pair in filter(None, body.split(",")):
        key, eq, raw = pair.partition("=")
        if not eq:
            raise click.BadParameter(f"{pair!r}: expected key=value", param_hint="--variant")
        if key in _REPLAY_KEYS:
            field_name = _REPLAY_KEYS[key]
            replay[field_name] = type(getattr(Replay(), field_name))(raw)
        elif key in types:
            changes[key] = _typed(raw, getattr(base, key))
        else:
            raise click.BadParameter(f"{key!r} is neither a ModelConfig field nor a replay key", param_hint="--variant")
    return name, Variant(base.replace(**changes), Replay(**replay))


def _typed(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        return raw.lower() == "true"
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float) or default is None:  # optional numbers (temperature, downsample_top)
        return None if raw.lower() == "none" else float(raw)
    return raw


@click.command("model-eval")
@click.option("--items", "n_items", default=20_000, show_default=True, help="Catalog size.")
@click.option("--users", "n_users", default=10_000, show_default=True)
@click.option("--clicks", "n_clicks", default=300_000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--zipf-exponent", type=float, default=SyntheticConfig.zipf_exponent, show_default=True,
              help="Item popularity skew of the synthetic stream.")
@click.option("--preference-strength", type=float, default=SyntheticConfig.preference_strength, show_default=True,
              help="How much a click depends on the user's taste (vs popularity) in the synthetic stream.")
@click.option("--batch-size", default=1024, show_default=True)
@click.option("-k", "k", default=50, show_default=True)
@click.option("--eval-every", default=5, show_default=True, help="Score every Nth batch before training on it.")
@click.option("--id-buckets", default=ModelConfig.id_buckets, show_default=True)
@click.option("--mixed-negatives", default=0, show_default=True,
              help="If > 0, add a peer 'logq_mixed' with this many uniform negatives per batch.")
@click.option("--downsample-top", type=float, default=None, envvar="STREAMRECALL_BENCH_DOWNSAMPLE_TOP",
              show_envvar=True, help="downsample_top of the logQ peers (default: the ModelConfig default).")
@click.option("--logq-alpha", type=float, default=None, envvar="STREAMRECALL_BENCH_LOGQ_ALPHA",
              show_envvar=True, help="logq_alpha of the logQ peers (default: the ModelConfig default).")
@click.option("--estimator-prior-gaps", type=float, default=None, envvar="STREAMRECALL_BENCH_ESTIMATOR_PRIOR_GAPS",
              show_envvar=True, help="estimator_prior_gaps of the logQ peers (default: the ModelConfig default).")
@click.option("--variant", "variants", multiple=True, envvar="STREAMRECALL_BENCH_VARIANT", show_envvar=True,
              help="Extra model peer NAME:key=value,... (ModelConfig fields; replay_steps, replay_capacity, "
                   "replay_half_life, replay_batch). Repeatable.")
@json_option
def command(n_items: int, n_users: int, n_clicks: int, seed: int, zipf_exponent: float, preference_strength: float,
            batch_size: int, k: int, eval_every: int, id_buckets: int, mixed_negatives: int,
            downsample_top: float | None, logq_alpha: float | None, estimator_prior_gaps: float | None,
            variants: tuple[str, ...], as_json: bool) -> None:
    """HR@K, tail HR@K, coverage@K and head slot share of every recommender, trained online in one pass.

    The model options (--downsample-top and the like) apply to the logQ peers only, so one run
    compares a lever against the same stream's other recommenders.
    """
    torch.manual_seed(seed)
    syn = SyntheticConfig(n_items=n_items, n_users=n_users, n_clicks=n_clicks, seed=seed,
                          zipf_exponent=zipf_exponent, preference_strength=preference_strength)
    base = ModelConfig(id_buckets=id_buckets, seed=seed)
    levers = {name: value for name, value in (("downsample_top", downsample_top), ("logq_alpha", logq_alpha),
                                              ("estimator_prior_gaps", estimator_prior_gaps)) if value is not None}
    models: dict[str, ModelConfig | Variant] = {"logq": base.replace(**levers), "no_logq": base.replace(logq=False)}
    models |= {tower: base.replace(tower=tower) for tower in TOWERS if tower != base.tower}  # the other family
    if mixed_negatives:
        models["logq_mixed"] = base.replace(mixed_negatives=mixed_negatives, **levers)
    for spec in variants:
        name, variant = parse_variant(spec, base)
        models[name] = variant
    res = evaluate_stream(syn, models, batch_size=batch_size, k=k, eval_every=eval_every)
    rows = []
    for name, s in res.peers.items():
        extra = f"scored={s['scored_clicks']} tail_scored={s['tail_clicks']}"
        for key in ("hr_at_k", "tail_hr_at_k", "coverage_at_k", "head_slot_share"):
            rows.append(result(f"model_eval/{key.replace('_k', f'_{k}')}/{name}", "ratio", s[key] or 0.0, extra=extra))
    rows.append(result("model_eval/train_examples_per_s", "examples/s", res.train_examples_per_s,
                       extra=f"per model, {len(models)} models; total {res.seconds:.0f} s"))
    report(rows, as_json)
