"""What the kernels use in place of Triton's standard library.

``tl.sum``, ``tl.sort``, ``tl.zeros``, ``tl.sigmoid``, ``tl.cdiv`` and the rest of
``triton.language.standard`` are ``@triton.jit`` functions themselves, made compiled or interpreted by
``TRITON_INTERPRET`` as it was when Triton was first imported. megatron-core and DeepSpeed import Triton
early, so in a process that sets ``TRITON_INTERPRET=1`` later (a test session) those functions cannot run
inside interpreted kernels. The kernels of this package therefore call only Triton builtins
(``tl.reduce``, ``tl.full``, ``tl.exp``, ...) and the functions defined here.
"""

import triton


@triton.jit
def add(a, b):
    """Combine function of sums: ``tl.reduce(x, axis, add)``."""
    return a + b
