"""Reward models behind one batched interface: ``build_reward(name, **options).score(images, prompts)``.

Installed as ``tpdm_rl.rewards``. Importing the package loads only the registry; reward models are
imported when first looked up.
"""

from tpdm_rl.core.reward_registry import (
    RewardError,
    build_reward,
    register_reward,
    reward_class,
    reward_options,
)

__all__ = ["RewardError", "build_reward", "register_reward", "reward_class", "reward_options"]
