"""Classification of torch-level functions seen while routing a model's forward.

``PASSTHROUGH``: data movement, metadata, predicates/masking and integer-only helpers; they run as
they are (the aten-level audit still checks what they do). ``FLOAT_COMPUTE``: known float compute
with no quantized twin; strict mode refuses them. Anything in neither set is "unclassified" and is
refused in strict mode as well (no silent float fallback).
"""
from __future__ import annotations

PASSTHROUGH = frozenset("""
size dim ndimension numel __len__ __get__ __set__ __iter__ __bool__ __index__ __int__ __float__ __hash__
__format__ __repr__ __contains__ __reversed__ __array__ item tolist is_floating_point is_complex is_contiguous
data_ptr element_size stride storage_offset get_device is_nonzero dtype shape device requires_grad_
view view_as reshape reshape_as transpose transpose_ t permute contiguous unsqueeze unsqueeze_ squeeze squeeze_
flatten unflatten expand expand_as repeat repeat_interleave tile cat concat concatenate stack hstack vstack
split split_with_sizes chunk unbind narrow select index_select gather take __getitem__ __setitem__ movedim
moveaxis swapaxes flip roll unfold diagonal triu tril triu_ tril_ pad
to type type_as float double half bfloat16 long int short bool byte char cpu cuda clone detach detach_ copy_
new_zeros new_ones new_empty new_full new_tensor zeros_like ones_like empty_like full_like zeros ones empty
full arange tensor as_tensor fill_ zero_ masked_fill masked_fill_ where
eq ne lt gt le ge __eq__ __ne__ __lt__ __gt__ __le__ __ge__ eq_ ne_ isinf isneginf isposinf isnan isfinite
logical_not logical_and logical_or logical_xor __and__ __or__ __xor__ __invert__ __iand__ __ior__ bitwise_not
any all nonzero argmax argmin max_pool_indices sort topk cumsum long_tensor
dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout _has_compatible_shallow_copy_type
_is_view _base __deepcopy__ __reduce_ex__ __setstate__ apply_ register_hook retain_grad backward
""".split())

FLOAT_COMPUTE = frozenset("""
exp exp_ log log_ log1p expm1 tanh sigmoid sigmoid_ sqrt rsqrt pow __pow__ __rpow__ erf sin cos mean sum
var std norm einsum baddbmm addmm addbmm mm mv bilinear softplus elu leaky_relu hardswish mish tanh_
multi_head_attention_forward batch_norm group_norm instance_norm rms_norm logsumexp cumprod prod
clamp clamp_ clip abs neg __neg__ reciprocal floor ceil round trunc frac sign relu6 hardtanh
interpolate upsample avg_pool1d avg_pool2d adaptive_avg_pool1d adaptive_avg_pool2d lstm gru rnn_tanh
""".split())
