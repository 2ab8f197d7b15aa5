"""The local tier's mirror, with the interleavings that could make it stale forced one by one.

Each test replays, in a fixed order, what the subscriber thread, a reader and a committing writer
do; the integration tests (integration/test_local_tier.py) run the same against Redis.
"""

from __future__ import annotations

import time

from sqlacache.mirror import Mirror

K = "p:{p}:v:db:users"


def live_mirror(heartbeat: float = 10.0) -> tuple[Mirror, int]:
    mirror = Mirror(heartbeat=heartbeat, limit=1000)
    epoch = mirror.go_live(time.monotonic())
    return mirror, epoch


def test_a_value_read_before_a_bump_whose_message_came_first_is_not_learned():
    mirror, epoch = live_mirror()
    mark = mirror.mark()  # the reader sends its MGET and reads "old"...
    assert mark is not None
    mirror.apply(epoch, b"new", [K])  # ...a bump after it is applied before the reader learns
    mirror.learn(mark, [K], [b"old"])
    assert mirror.matches([K], [b"new"])
    assert not mirror.matches([K], [b"old"])


def test_a_value_read_before_a_bump_whose_message_comes_later_is_overwritten():
    mirror, epoch = live_mirror()
    mark = mirror.mark()
    assert mark is not None
    mirror.learn(mark, [K], [b"old"])
    mirror.apply(epoch, b"new", [K])
    assert mirror.matches([K], [b"new"])


def test_nothing_is_learned_from_a_read_sent_before_the_subscription_was_live():
    mirror = Mirror(heartbeat=10.0, limit=1000)
    assert mirror.mark() is None  # not subscribed yet: bumps may be missed
    mirror.go_live(time.monotonic())
    mark = mirror.mark()
    mirror.drop()  # the connection was lost between the read and the learn
    mirror.go_live(time.monotonic())
    assert mark is not None
    mirror.learn(mark, [K], [b"old"])
    assert not mirror.matches([K], [b"old"])


def test_a_learn_older_than_an_evicted_change_is_refused():
    mirror = Mirror(heartbeat=10.0, limit=2)
    epoch = mirror.go_live(time.monotonic())
    mark = mirror.mark()
    assert mark is not None
    mirror.apply(epoch, b"new", [K])
    mirror.apply(epoch, b"x", ["a", "b"])  # K is evicted, with its change after the mark
    mirror.learn(mark, [K], [b"old"])
    assert not mirror.matches([K], [b"old"])


def test_an_own_commit_hides_the_old_token_before_commit_returns():
    mirror, epoch = live_mirror()
    mirror.apply(epoch, b"t1", [K])
    mark = mirror.mark()
    mirror.apply_own(mark, b"t2", [K])  # the bump's reply came back; its message has not
    assert not mirror.matches([K], [b"t1"])
    mirror.apply(epoch, b"t1b", [K])  # an older bump by another process, delivered late
    assert not mirror.matches([K], [b"t1b"])
    mirror.apply(epoch, b"t2", [K])  # the own message
    assert mirror.matches([K], [b"t2"])
    mirror.apply(epoch, b"t3", [K])  # and what follows it
    assert mirror.matches([K], [b"t3"])


def test_an_own_message_that_arrived_before_the_reply_leaves_the_mirror_current():
    mirror, epoch = live_mirror()
    mark = mirror.mark()
    mirror.apply(epoch, b"t2", [K])  # the subscriber thread was quicker than the committer
    mirror.apply_own(mark, b"t2", [K])
    assert mirror.matches([K], [b"t2"])


def test_an_own_message_overtaken_before_the_reply_leaves_the_newer_token():
    mirror, epoch = live_mirror()
    mark = mirror.mark()
    mirror.apply(epoch, b"t2", [K])
    mirror.apply(epoch, b"t3", [K])  # another process bumped again right after
    mirror.apply_own(mark, b"t2", [K])  # t2 was delivered: t3 is the newer truth
    assert mirror.matches([K], [b"t3"])


def test_an_own_message_forgotten_before_the_reply_is_resolved_by_the_next_heartbeat(
    monkeypatch,
):
    import sqlacache.mirror as local_tier

    monkeypatch.setattr(local_tier, "DELIVERED_MEMORY", 1)
    mirror, epoch = live_mirror()
    mark = mirror.mark()
    mirror.apply(epoch, b"t2", [K])
    mirror.apply(epoch, b"t3", [K])
    mirror.apply(epoch, b"x", ["other"])  # the delivered memory forgot (K, t2)
    mirror.apply_own(mark, b"t2", [K])
    assert not mirror.matches([K], [b"t2"]) and not mirror.matches([K], [b"t3"])
    later = mirror.mark()
    assert later is not None
    mirror.learn(later, [K], [b"t3"])
    assert not mirror.matches([K], [b"t3"])  # still waiting for its own message
    mirror.confirm(epoch, time.monotonic())  # everything before now was delivered
    later = mirror.mark()
    assert later is not None
    mirror.learn(later, [K], [b"t3"])  # a fresh read can teach it again
    assert mirror.matches([K], [b"t3"])


def test_an_own_bump_of_unknown_outcome_leaves_the_key_unknown():
    mirror, epoch = live_mirror()
    mirror.apply(epoch, b"t1", [K])
    mirror.apply_own(mirror.mark(), None, [K])
    assert not mirror.matches([K], [b"t1"])


def test_the_mirror_is_not_fresh_once_a_heartbeat_is_overdue():
    mirror = Mirror(heartbeat=0.05, limit=1000)
    epoch = mirror.go_live(time.monotonic())
    assert mirror.fresh()
    time.sleep(0.06)
    assert not mirror.fresh()  # whatever the subscriber thread is doing
    mirror.confirm(epoch, time.monotonic())
    assert mirror.fresh()


def test_a_dropped_mirror_serves_nothing_and_ignores_messages_of_the_old_subscription():
    mirror, epoch = live_mirror()
    mirror.apply(epoch, b"t1", [K])
    mirror.drop()
    assert not mirror.fresh()
    assert not mirror.matches([K], [b"t1"])
    new_epoch = mirror.go_live(time.monotonic())
    mirror.apply(epoch, b"t2", [K])  # a late message of the lost subscription
    assert not mirror.matches([K], [b"t2"])
    mirror.apply(new_epoch, b"t3", [K])
    assert mirror.matches([K], [b"t3"])
