"""Named columns of the multi-tensor plan's tables (torch_clip_fused/backends/triton/plan.py), shared
by the plan that writes them and the kernels that read them."""

import triton.language as tl

# tensor-table columns
T_P_PTR = tl.constexpr(0)  # parameter data pointer
T_M_PTR = tl.constexpr(1)  # momentum buffer data pointer (0 without momentum)
T_NUMEL = tl.constexpr(2)  # number of elements
T_FLAT_OFFSET = tl.constexpr(3)  # first element's position in the param group laid end to end
T_COLUMN = tl.constexpr(4)  # position in the param group (history column, layer-scope draw index)
T_INDEX = tl.constexpr(5)  # position in the step's tensor list (grad_ptrs, per-tensor scratch)
T_V_PTR = tl.constexpr(6)  # AdamW's exp_avg_sq data pointer (0 without AdamW)
T_VMAX_PTR = tl.constexpr(7)  # AdamW's max_exp_avg_sq data pointer (0 without amsgrad)
T_UNIT_NUMEL = tl.constexpr(8)  # unit scope: elements per output unit, numel / units (1 for an empty tensor)
T_UNIT_BASE = tl.constexpr(9)  # unit scope: position of the tensor's first unit among the step's units (scratch)
T_UNIT_CHUNKS = tl.constexpr(10)  # unit scope: chunks per unit when a unit spans chunks, else 0 (whole units)
T_INDEX_INNER = tl.constexpr(11)  # a shard that is not a row-major range: its elements per row of the cut dim
T_INDEX_EXTRA = tl.constexpr(12)  # and the parameter's minus the shard's (0: a row-major range); index_rows
TABLE_WIDTH = tl.constexpr(13)
# chunk-table columns
C_ROW = tl.constexpr(0)  # row of the bucket's tensor table
C_START = tl.constexpr(1)  # first element of the chunk within its tensor
C_ID = tl.constexpr(2)  # chunk id in the whole step (per-chunk scratch)
C_END = tl.constexpr(3)  # one past the chunk's last element within its tensor
CHUNK_WIDTH = tl.constexpr(4)
