"""fastbon's ops: each validates its inputs, picks a backend and calls it (see ``fastbon.dispatch``)."""

from .attention import shared_prefix_attention
from .sampling import sample
from .skinny_linear import skinny_linear
from .topk import select_topk
from .tree_attention import tree_attention

__all__ = ["sample", "select_topk", "shared_prefix_attention", "skinny_linear", "tree_attention"]
