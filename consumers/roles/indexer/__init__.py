"""The indexer role: items, model updates and user vectors in; an HNSW index and the recall API out.

Every replica reads every partition (``assign_all``): each holds the whole catalog.

Per polled batch the handler applies, in this order: model updates (so new items are
encoded by the newest tower), items (encoded in micro-batches and upserted; ``deleted``
removes them), user vectors (the latest per user, in memory). Re-encoding after a model
update runs in a background thread (``consumers/roles/indexer/reencoder.py``) while the loop goes on.

**Durability.** The role's durable state is its snapshot (``consumers/roles/indexer/snapshot.py``),
written every ``snapshot_interval_s`` from ``flush`` and once more at shutdown. Restart
resumes from the snapshot's offsets, never from the group's committed offsets: those are
still committed by the runtime after every flush, but only feed lag monitoring
(``streamrecall status``). So ``flush`` is cheap — it notes the offsets the next snapshot
covers — and a crash loses nothing: the records after the last snapshot are read again
(upserts and deletes are idempotent).

**Model updates** arrive in chunks (``consumers/update_chunks.py``) and go through the one
:class:`~streamrecall.consumers.updates.ModelUpdateStream`: a version is applied when its last
chunk is read, never in part. The model-updates offset a snapshot records is the next one to
read *that loses nothing*: the first record of a sequence still being read, else the runtime's
next offset. So a snapshot or a kill -9 in the middle of a sequence re-reads the whole version.

**Restart.** With ``--from committed`` (the default) the current snapshot is loaded, then the
model updates from the first record of the last *full* update the replica applied up to the
snapshot's model-updates offset are re-read before the poll loop starts, so the replica is
rebuilt exactly; updates up to the snapshot's ``settled_version`` re-encode nothing (the index
already holds their vectors), later ones re-encode as usual. Items resume at the
snapshot's offsets; ``user-vectors`` is re-read from the beginning. Any other ``--from``
starts from an empty index and reads as told.
"""
