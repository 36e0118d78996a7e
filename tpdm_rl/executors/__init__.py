"""Executors: where the controller's roles run (one process, or Ray actor pools and a DeepSpeed learner group)."""
