"""What a user would otherwise do: the base detector, the naive pipeline (NAS -> prune -> KD) and
the compute-matched `control` and `prune_kd` pipelines (DESIGN §10)."""
