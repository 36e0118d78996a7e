"""Layer 0, the foundation: validated config and its YAML I/O, prompts, RNG streams, sigma tables and method
strings, the reward registry, threads, devices, files and console helpers. It imports nothing above it, and neither
rollout/ nor rewards/."""
