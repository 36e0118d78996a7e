"""Layer 1, the algorithm: the TPM policy, its action distributions (``beta``, ``stop-ratio``), the clipped
GRPO/PPO objective and the typed messages the roles exchange. Pure torch: no Ray, no files, no models."""
