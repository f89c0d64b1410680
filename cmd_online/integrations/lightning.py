"""CMD for PyTorch Lightning: ``Trainer(callbacks=[CMDCallback(modes=5, warmup=10)])``.

For the ``pytorch_lightning`` namespace use ``cmd_online.integrations.pytorch_lightning``. See
docs/integrations.md.
"""

from __future__ import annotations

try:
    import lightning.pytorch as _pl
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("cmd_online.integrations.lightning needs Lightning ≥ 2.0: pip install 'cmd-online[lightning]' "
                      "(for the pytorch_lightning package use cmd_online.integrations.pytorch_lightning)") from e

from ._lightning import LightningCMDHooks

__all__ = ["CMDCallback"]


class CMDCallback(LightningCMDHooks, _pl.Callback):
    __doc__ = LightningCMDHooks.__doc__
