from .grade import GumbelGRADETrainer, grade_loss
from .grade_config import GumbelGRADEConfig
from .relaxations import RELAXATIONS, GumbelSoftmax, StraightThroughGumbel, tau_at

__all__ = ["RELAXATIONS", "GumbelGRADEConfig", "GumbelGRADETrainer", "GumbelSoftmax", "StraightThroughGumbel", "grade_loss", "tau_at"]
