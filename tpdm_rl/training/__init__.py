"""Layers 2-3, the training loop and its roles: the learners (one process, DeepSpeed), checkpoints, TPM files and run
folders, metrics, resources, the controller that runs one iteration, and the known-optimum sanity world."""
