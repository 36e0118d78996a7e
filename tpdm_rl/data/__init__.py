"""Shipped data: the toy and places backbones, their prompt splits and hand-made sigma tables, and the SD3 prompt
lists. Read through ``builtin:`` names (tpdm_rl/core/prompts.py, tpdm_rl/core/tables.py); no code lives here."""
