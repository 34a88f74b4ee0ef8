"""m2dx_clinic: M2D / M2D-X audio representation learning for small clinical sound collections.

Start from a published AudioSet M2D checkpoint, further pre-train it on your own recordings
(M2D-X: masked prediction + a frozen teacher + background-noise denoising), fine-tune, and report
ICBHI-style Sensitivity / Specificity / Score.
"""

__version__ = "0.2.0"
