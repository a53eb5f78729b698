"""Data sets (VOC 2012 devkit, ImageNet subset, synthetic), transforms and the VOC palette."""
