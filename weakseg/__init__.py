"""weakseg: weakly supervised semantic segmentation from image-level labels.

Implements Pandey & Dukkipati, "Learning to segment with image-level
supervision" (WACV 2019): a VGG16 encoder-decoder trained with an adaptive
max-entropy pixel-label prior and a KL neighbourhood (mean-field) loss.
"""

__version__ = "0.1.0"
