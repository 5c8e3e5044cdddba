"""Fast tests of the stream layer: the in-memory client pair in fakes.py is importable from here
(the same arrangement as tests/faults and its faultkit)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
