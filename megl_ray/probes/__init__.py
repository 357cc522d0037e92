"""Measurement probes run by the tests and benches through the trainer's own pieces: fixed-batch training in one
process or N Ray Train + DeepSpeed workers, and a save/rebuild/resume probe of the large-model path."""
