"""Framework backends, imported lazily by :func:`unihead.compile`.

One module per framework: ``unihead.backends.numpy``, ``.torch``, ``.jax``, ``.keras``.  Each
exposes ``compile_head(head, **options)`` returning a :class:`unihead.CompiledHead`.  Importing
this package imports no framework.
"""
