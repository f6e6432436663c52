"""``InfluenceCallback`` for the ``pytorch_lightning`` namespace.

``lightning.pytorch`` and ``pytorch_lightning`` are two copies of the same framework whose
classes don't mix (a ``pytorch_lightning.Trainer`` rejects a ``lightning.pytorch.Callback``).
This is the same callback (one implementation, :class:`~lightning_influence.callback.InfluenceCallbackMixin`)
on ``pytorch_lightning.Callback``::

    import pytorch_lightning as pl
    from lightning_influence.pl import InfluenceCallback

    trainer = pl.Trainer(callbacks=[InfluenceCallback(method="fvm")])
"""
from __future__ import annotations

from pytorch_lightning.callbacks import Callback as _Callback

from .callback import InfluenceCallbackError, InfluenceCallbackMixin


class InfluenceCallback(InfluenceCallbackMixin, _Callback):
    __doc__ = InfluenceCallbackMixin.__doc__
    _namespace = "pytorch_lightning"


__all__ = ["InfluenceCallback", "InfluenceCallbackError"]
