"""The trainer role: clicks in, model updates out, checkpoints on disk (docs/roles.md).

- ``clicks`` (group subscription) are trained on in micro-batches of up to ``batch_size``;
  a partial batch is trained once its oldest click waited ``max_batch_wait_ms``.
- ``items`` is read whole by every trainer as a table (a side reader, from the beginning at
  start, then non-blocking polls in ``tick``); clicks on items not in it train on the id.
- A model update goes to ``model-updates`` at every runtime flush that follows training
  (every ``flush_interval_ms``, 200 ms by default), and every ``publish_every_steps`` steps
  while a backlog is trained. Each carries the sparse rows touched since the previous one and,
  at most every ``dense_every_s``, the dense layers; one every ``full_every_s`` is full, and so
  is the first one of each process (at start when a checkpoint was restored). Each travels in
  chunks of at most ``model_update_chunk_bytes`` (``consumers/update_chunks.py``: no record
  above 1 MiB; a small update is one record).
- **What a commit means.** ``flush`` trains what is buffered, publishes and waits for the
  broker's acknowledgement before the runtime commits the click offsets, so a committed click
  is one whose learning is on ``model-updates``: zero lag on the trainer's group means
  replicas can have everything the trainer knows. A failed publish (refused by the producer or
  not acknowledged) is logged and counted and blocks the commit (``TransientError``), but the
  trainer keeps consuming and training (the runtime retries the flush with back-off, without
  pausing), waits ``publish_backoff_s``, doubling up to ``publish_backoff_max_s``, before the
  next attempt, and makes that one full, which heals the chain. It never crash-loops.
- Model, estimator, optimiser state, trending, histories and the next click offsets to read
  are one checkpoint file, written atomically every ``checkpoint_every_s`` (from the
  runtime's ``flush``) and at shutdown. A restart resumes clicks from the checkpoint's
  offsets, not from the group's committed offsets (which may run ahead of it).
"""
