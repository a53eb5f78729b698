"""The paper's losses, importable into any training code (as rloss's DenseCRFLoss is).

    from weakseg.losses import (adaptive_prior, pixel_label_targets,
                                neighborhood_distribution, neighborhood_loss)
"""

from weakseg.losses.neighborhood import neighborhood_distribution, neighborhood_loss
from weakseg.losses.prior import adaptive_prior, pixel_label_targets

__all__ = ["adaptive_prior", "pixel_label_targets", "neighborhood_distribution", "neighborhood_loss"]
