"""tpdm-rl: RL-trained adaptive denoising schedules (TPDM) for diffusion models."""

__version__ = "0.1.0"
