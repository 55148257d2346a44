"""Round modes: what a round samples, scores and trains on (stored rollouts, or online sampling)."""
