"""Callbacks that record CMD inside training frameworks; each is an optional extra.

- ``cmd_online.integrations.lightning.CMDCallback``: PyTorch Lightning ≥ 2.0
  (``pip install 'cmd-online[lightning]'``); ``cmd_online.integrations.pytorch_lightning.CMDCallback`` for the
  ``pytorch_lightning`` namespace.
- ``cmd_online.integrations.transformers.CMDCallback``: the Hugging Face ``Trainer``
  (``pip install 'cmd-online[transformers]'``).

Importing this package imports no framework; see docs/integrations.md.
"""
