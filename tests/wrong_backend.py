"""A deliberately wrong third-party backend for the conformance tests: label smoothing puts
eps / (K - 1) (not eps / K) on each wrong class, a convention people expect (PyTorch issue
#148884).  Everything else is the NumPy backend.  Run it with
``unihead conformance --backend tests.wrong_backend:compile_head``."""

from __future__ import annotations

from unihead.backends.numpy import NumpyHead


class WrongSmoothing(NumpyHead):
    def _engine(self):
        head = self.head
        eps = head.label_smoothing
        if eps and head.activation == "softmax":
            k = head.num_outputs
            # (1 - e') onehot + e'/K with e' = eps K / (K - 1): true class 1 - eps, others eps/(K-1)
            head = head.replace(label_smoothing=eps * k / (k - 1))
        from unihead._engine import Engine

        return Engine(head, self.ops)


def compile_head(head, **options):
    return WrongSmoothing(head, **options)
