"""A role-less worker for the runtime tests, run as its own process so it can be SIGKILLed.

It records every handled (topic, partition, offset) to a file, fsyncs in flush, and
with ``--kill-after N`` kills itself with SIGKILL inside the first flush after N
records were handled: after handling, before the commit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import DeadLetterSink
from streamrecall.consumers.handler import HandlerBase, Record
from streamrecall.consumers.runtime import Runtime
from streamrecall.consumers.start import parse_start
from streamrecall.events import Click, Decoder
from streamrecall.settings import Settings


class RecordingHandler(HandlerBase):
    def __init__(self, out: Path, kill_after: int | None) -> None:
        self.out = open(out, "a")
        self.kill_after = kill_after
        self.handled = 0

    def handle(self, records: list[Record]) -> None:
        for r in records:
            self.out.write(f"{r.topic} {r.partition} {r.offset} {r.value.user_id}\n")
        self.handled += len(records)

    def flush(self, offsets) -> None:
        self.out.flush()
        os.fsync(self.out.fileno())
        if self.kill_after is not None and self.handled >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kill-after", type=int)
    p.add_argument("--from", dest="start", default="committed")
    a = p.parse_args()
    s = Settings(bootstrap_servers=a.bootstrap, topic_prefix=a.prefix, group_prefix=a.group, partitions=2)
    consumer = make_consumer(s, s.group_id("test"))
    dl = DeadLetterSink(make_producer(s), s.topics.deadletter, "test")
    rt = Runtime(role="test", consumer=consumer, deadletters=dl, handler=RecordingHandler(a.out, a.kill_after),
                 topics={s.topics.clicks: ("clicks", Decoder(Click).decode)}, start=parse_start(a.start),
                 flush_interval_ms=50, max_poll_records=100)
    rt.install_signal_handlers()
    rt.run(max_seconds=60, until=rt.caught_up)
    sys.exit(0)


if __name__ == "__main__":
    main()
