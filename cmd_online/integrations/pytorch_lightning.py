"""CMD for the ``pytorch_lightning`` namespace: the same callback as ``cmd_online.integrations.lightning``."""

from __future__ import annotations

try:
    import pytorch_lightning as _pl
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("cmd_online.integrations.pytorch_lightning needs pytorch_lightning ≥ 2.0 "
                      "(pip install pytorch-lightning); for `import lightning` use "
                      "cmd_online.integrations.lightning") from e

from ._lightning import LightningCMDHooks

__all__ = ["CMDCallback"]


class CMDCallback(LightningCMDHooks, _pl.Callback):
    __doc__ = LightningCMDHooks.__doc__
