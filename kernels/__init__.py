"""Triton kernels of lipforcing, one file per op (installed as ``lipforcing.kernels``).

Each file holds the ``@triton.jit`` kernel(s) and a launcher ``<op>_triton`` with the backend signature that
``lipforcing/ops/<op>.py`` documents.  Set ``TRITON_INTERPRET=1`` *before* importing to run them on the CPU.
"""
