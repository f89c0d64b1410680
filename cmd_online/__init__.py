"""cmd_online: online Correlation Mode Decomposition (CMD) of neural-network training trajectories."""

from .config import CMDConfig, RunOptions
from .posthoc import decompose, decompose_checkpoints, fit_affine
from .recorder import CMDRecorder
from .trajectory import CMDTrajectory

__all__ = ["CMDConfig", "CMDRecorder", "RunOptions", "CMDTrajectory", "decompose", "decompose_checkpoints", "fit_affine"]
__version__ = "0.1.0"
