"""Triton kernels of leanops, one module per op family, installed as ``leanops.triton_kernels``.

Importing a module here imports triton. On a machine without a GPU the kernels run only under Triton's interpreter,
which must be enabled (``TRITON_INTERPRET=1``) before this package is first imported.
"""
