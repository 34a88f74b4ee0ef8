"""m2dx_clinic: M2D / M2D-X audio representation learning for small clinical sound collections.

Start from a published AudioSet M2D checkpoint, further pre-train it on your own recordings
(M2D-X: masked prediction + a frozen teacher + background-noise denoising), fine-tune, judge the
result next to a classical baseline and chance, and classify new recordings:

    from m2dx_clinic import load_classifier, predict
    clf = load_classifier("runs/lung_ft/best.pt")
    result = predict("runs/lung_ft", ["new_recording.wav"], "predictions/")

The two names are imported on first use, so `import m2dx_clinic` (and the command line) stays quick.
"""

from ._version import __version__

__all__ = ["__version__", "load_classifier", "predict"]


def __getattr__(name: str):
    if name == "load_classifier":
        from .checkpoint.classifier import load_classifier

        return load_classifier
    if name == "predict":
        from .predict import predict

        return predict
    raise AttributeError(f"module 'm2dx_clinic' has no attribute {name!r}")
