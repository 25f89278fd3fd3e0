"""How the honesty audit classifies aten ops (see docs/quantization.md).

data movement: copies/selects/reshapes existing values, so integer inputs stay integer (tags follow);
creation: constants and index ranges; predicate: comparisons producing booleans (masks);
everything else is compute and must take inputs on a declared integer grid.
"""
from __future__ import annotations

DATA_MOVEMENT = frozenset("""
view _unsafe_view reshape _reshape_alias t transpose permute expand unsqueeze squeeze slice select index
index_select gather cat stack split split_with_sizes chunk unbind narrow clone contiguous alias detach
_to_copy to copy_ copy masked_fill where triu tril flip roll repeat repeat_interleave as_strided unfold
movedim constant_pad_nd index_put index_put_ masked_scatter scatter slice_scatter select_scatter
view_copy t_copy permute_copy transpose_copy unsqueeze_copy squeeze_copy slice_copy select_copy
expand_copy _local_scalar_dense set_ resize_ masked_fill_ unsafe_split split_copy diagonal
""".split())

CREATION = frozenset("""
empty empty_like empty_strided zeros zeros_like ones ones_like full full_like arange scalar_tensor
new_empty new_zeros new_ones new_full new_empty_strided fill fill_ zero_ lift_fresh lift_fresh_copy
""".split())

PREDICATE = frozenset("""
eq ne lt gt le ge isinf isneginf isposinf isnan isfinite logical_not logical_and logical_or logical_xor
bitwise_not bitwise_and bitwise_or bitwise_xor any all
""".split())

MAC_OPS = frozenset("mm addmm bmm baddbmm convolution _convolution mv".split())
