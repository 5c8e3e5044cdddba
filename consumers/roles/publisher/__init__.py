"""The publisher role: clicks and model updates in, fresh user vectors out (docs/roles.md).

- ``clicks`` (group subscription, split by user): each user's recent items are kept per
  clicks partition; users with new clicks are encoded in micro-batches (published at the
  end of each polled batch by default, at most ``flush_ms`` later, or as soon as
  ``flush_users`` are pending) and sent to the compacted ``user-vectors`` topic.
- ``model-updates`` (a side reader: every publisher applies every update, from the last
  full one): on a new version, recently active users are re-published in the background, most
  recently active first (only those the update touches, for a sparse delta), in rounds at most
  every ``refresh_interval_s``: at most ``refresh_per_s`` users a second while clicks flow,
  ``refresh_per_tick`` per loop iteration when they pause. The indexer does not wait for them: it encodes
  a user whose stored vector is of another version at query time.
- State moves with a partition: a newly assigned clicks partition is rebuilt from the
  same-numbered partition of ``user-vectors`` (its ``recent_items`` are the history), and
  replayed clicks at or before a user's ``event_ts`` there are skipped.
- ``flush`` publishes what is pending and flushes the producer before the runtime commits.
"""
