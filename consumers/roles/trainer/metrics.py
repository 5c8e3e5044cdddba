"""The trainer's Prometheus metrics (docs/operations.md has the table)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from streamrecall.metrics import LATENCY_BUCKETS


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.loss = Gauge("streamrecall_trainer_loss", "Loss of the latest training step.", registry=registry)
        self.steps = Counter("streamrecall_trainer_steps_total", "Training steps taken.", registry=registry)
        self.examples = Counter("streamrecall_trainer_examples_total", "Clicks trained on.", registry=registry)
        self.replay_steps = Counter("streamrecall_trainer_replay_steps_total",
                                    "Training steps on replayed clicks, taken while the stream was idle.",
                                    registry=registry)
        self.unknown_items = Counter("streamrecall_trainer_unknown_item_clicks_total",
                                     "Clicks on items not (yet) seen on the items topic; trained on the id only.",
                                     registry=registry)
        self.step_seconds = Histogram("streamrecall_trainer_step_seconds", "Time of one training step.",
                                      buckets=LATENCY_BUCKETS, registry=registry)
        self.estimator_top_p = Gauge("streamrecall_trainer_estimator_top_probability",
                                     "Largest estimated item sampling probability (1/B).", registry=registry)
        self.estimator_median_p = Gauge("streamrecall_trainer_estimator_median_probability",
                                        "Median estimated probability over items seen in recent batches.",
                                        registry=registry)
        self.updates_published = Counter("streamrecall_trainer_updates_published_total",
                                         "Model updates sent, by kind.", ["kind"], registry=registry)
        for kind in ("full", "delta"):
            self.updates_published.labels(kind)
        self.publish_failures = Counter("streamrecall_trainer_update_publish_failures_total",
                                        "Model updates the broker did not acknowledge.", registry=registry)
        self.acked_version = Gauge("streamrecall_trainer_acked_model_version",
                                   "Newest model version the broker acknowledged on model-updates.", registry=registry)
        self.acked_time = Gauge("streamrecall_trainer_last_acked_update_timestamp_seconds",
                                "Unix time the broker last acknowledged a model update.", registry=registry)
        self.update_bytes = Histogram("streamrecall_trainer_update_bytes", "Size of published model updates.",
                                      buckets=(1e4, 1e5, 1e6, 4e6, 16e6, 64e6, 256e6, 1e9), registry=registry)
        self.full_interval = Gauge("streamrecall_trainer_full_update_interval_seconds",
                                   "Seconds the next full update is due after the last: full_every_s, or longer for a "
                                   "big model (full_bytes_per_s).", registry=registry)
        self.update_chunks = Histogram("streamrecall_trainer_update_chunks",
                                       "Records (chunks of at most 1 MiB) per published model update.",
                                       buckets=(1, 2, 4, 16, 64, 256, 1024), registry=registry)
        # Data-parallel jobs (--world-size > 1) only.
        self.empty_shares = Counter("streamrecall_trainer_empty_shares_total",
                                    "Collective steps this rank joined with no click of its own (an idle rank).",
                                    registry=registry)
        self.collective_bytes = Counter("streamrecall_trainer_collective_sent_bytes_total",
                                        "Bytes this rank sent in the collectives of its training steps.",
                                        registry=registry)
        self.checkpoint_time = Gauge("streamrecall_trainer_checkpoint_timestamp_seconds",
                                     "Unix time of the last durable checkpoint.", registry=registry)
