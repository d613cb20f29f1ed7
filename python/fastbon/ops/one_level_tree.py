"""A two-level attention kernel serving one-level trees (the registry lets it take no deeper tree)."""


class OneLevelTree:
    """tree_attention's backend contract on a two-level kernel (a ``shared_prefix_attention`` function): what the
    cuda backend, and a registered backend without a tree kernel, run for one-level trees (the registry lets them
    take no deeper tree)."""

    def __init__(self, two_level):
        self.two_level = two_level

    def plan_tree(self, plan):
        return None

    def tree_attention(self, plan, q, level_keys, level_values, suffix_k, suffix_v, suffix_lens, scale, window=None,
                       softcap=None, sinks=None):
        features = () if window is None and softcap is None and sinks is None else (window, softcap, sinks)
        return self.two_level(q, level_keys[0], level_values[0], plan.level_lens[0], suffix_k, suffix_v, suffix_lens,
                              plan.level_segments[0], scale, *features)
