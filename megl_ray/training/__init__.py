"""What runs inside a Ray Train worker: the loop (``worker``), exact sample accounting, collectives, per-rank state,
divergence guards, the DeepSpeed config and optimiser, the typed plan the driver hands over (``plan``), and the
one-process reference trainer (``local``)."""
