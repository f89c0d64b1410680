"""Baselines the paper compares CMD with. EMA and SWA come from ``torch.optim.swa_utils``; DMD lives here."""

from .dmd import DMD, NodeDMD, dmd, node_dmd, node_groups

__all__ = ["DMD", "NodeDMD", "dmd", "node_dmd", "node_groups"]
