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
TABLE_WIDTH = tl.constexpr(6)
# chunk-table columns
C_ROW = tl.constexpr(0)  # row of the bucket's tensor table
C_START = tl.constexpr(1)  # first element of the chunk within its tensor
C_ID = tl.constexpr(2)  # chunk id in the whole step (per-chunk scratch)
CHUNK_WIDTH = tl.constexpr(3)
