import msgspec
import pytest

from streamrecall.errors import ConfigError
from streamrecall.events import Click, Item
from streamrecall.devtools.synthetic import SyntheticConfig, generate


def test_deterministic_ordered_and_on_contract():
    config = SyntheticConfig(n_items=300, n_users=50, n_clicks=5_000, new_item_share=0.3,
                             update_share=0.1, delete_share=0.1, seed=3)
    events = list(generate(config))
    assert events == list(generate(config))
    assert events != list(generate(SyntheticConfig(n_items=300, n_users=50, n_clicks=5_000, seed=4)))
    alive, last_ts, clicks, deletes, updates = set(), 0, 0, 0, 0
    seen = set()
    for topic, key, value in events:
        if topic == "items":
            item = msgspec.convert(value, Item)
            assert key == item.item_id
            if item.deleted:
                deletes += 1
                alive.discard(item.item_id)
            else:
                updates += item.item_id in seen
                seen.add(item.item_id)
                alive.add(item.item_id)
        else:
            click = msgspec.convert(value, Click)
            assert key == click.user_id and click.item_id in alive
            assert click.ts >= last_ts
            last_ts = click.ts
            clicks += 1
    assert clicks <= 5_000 and clicks > 4_900
    assert deletes == 30 and 0 < updates <= 30
    assert len(seen) == 300


def test_new_items_appear_during_the_stream_and_get_clicked():
    config = SyntheticConfig(n_items=1_000, n_users=100, n_clicks=20_000, new_item_share=0.5)
    first_click_ts = None
    late = set()
    clicked = set()
    for topic, _, value in generate(config):
        if topic == "clicks":
            first_click_ts = first_click_ts or value["ts"]
            clicked.add(value["item_id"])
        elif first_click_ts is not None:
            late.add(value["item_id"])
    assert len(late) >= 400 and late & clicked


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="new_item_share"):
        SyntheticConfig(new_item_share=1.0)
    with pytest.raises(ConfigError, match="n_items"):
        SyntheticConfig(n_items=0)
