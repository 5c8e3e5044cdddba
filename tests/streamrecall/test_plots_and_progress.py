"""--plot pictures and progress bars: real PNGs from real data; no bar when stderr is not a TTY."""

from __future__ import annotations

import numpy as np
import pytest

from streamrecall.devtools.bench import plots
from streamrecall.ops.progress import track


def is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000


def test_each_picture_is_a_png_of_its_data(tmp_path):
    rng = np.random.default_rng(0)
    assert is_png(plots.cdf(tmp_path / "c.png", {"a": rng.random(500).tolist(), "b": [0.2, 0.3]},
                            title="t", xlabel="s", target=1.0))
    assert is_png(plots.per_chunk(tmp_path / "h.png", {"live": [0.1, 0.2, 0.15], "most popular": [0.1, 0.1, 0.1]},
                                  title="t", ylabel="HR@50"))
    assert is_png(plots.over_time(tmp_path / "o.png", [1, 3, 5], {"p99": [0.5, 0.7, 0.6]}, title="t", ylabel="s"))
    points = [{"ef": e, "recall": 0.9 + e / 1000, "qps": 5000 / e, "raw_recall": 0.9 + e / 1000, "raw_qps": 9000 / e}
              for e in (32, 64, 128)]
    assert is_png(plots.recall_vs_qps(tmp_path / "r.png", points, title="t"))


def test_nothing_to_draw_writes_nothing(tmp_path):
    assert plots.cdf(tmp_path / "c.png", {"a": []}, title="t", xlabel="s") is None
    assert not (tmp_path / "c.png").exists()


def test_track_passes_items_through_and_stays_quiet_off_a_terminal(capfd: pytest.CaptureFixture[str]):
    assert list(track(iter(range(1000)), desc="x")) == list(range(1000))
    assert capfd.readouterr().err == ""  # pytest's stderr is not a TTY: no bar
