"""Builders of the models tests and demos use: the tiny, toy (with its trainer) and random SD3 backbones, the tiny
and random FLUX.1 backbones, the tiny reward models in the real file formats, and the offline tokenizers they share.

Why a package of its own: the runtime (``tpdm_rl.rollout``, ``tpdm_rl.rewards``) loads such folders but never
builds them, so it imports nothing from here (tests/test_layers.py); ``tpdm-rl make-*`` (``tpdm_rl/commands/make.py``)
and the controller (the tiny backbone of an empty ``backbone.path``) do.
"""
