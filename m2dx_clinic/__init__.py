"""m2dx_clinic: M2D / M2D-X audio representation learning for small clinical sound collections.

Start from a published AudioSet M2D checkpoint, further pre-train it on your own recordings
(M2D-X: masked prediction + a frozen teacher + background-noise denoising), fine-tune, judge the
result next to a classical baseline and chance, and classify new recordings:

    from m2dx_clinic import load_classifier, predict
    clf = load_classifier("runs/lung_ft/best.pt")
    result = predict("runs/lung_ft", ["new_recording.wav"], "predictions/")

The two names are imported on first use, so `import m2dx_clinic` (and the command line) stays quick.
`m2dx_clinic.predict` is always the FUNCTION: the module of the same name is reached with
`from m2dx_clinic.predict import ...` (Python would otherwise put the module under the package's
name as soon as anything imported it, and the documented code would call a module).
"""

import sys
import types

from ._version import __version__

__all__ = ["__version__", "load_classifier", "predict"]
_FUNCTIONS = {"load_classifier": ("checkpoint.classifier", "load_classifier"), "predict": ("predict", "predict")}


class _Package(types.ModuleType):
    """The package module: a submodule import never replaces a public function of the same name."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return  # the submodule stays in sys.modules; the package's name means the function
        super().__setattr__(name, value)


def __getattr__(name: str):
    if name not in _FUNCTIONS:
        raise AttributeError(f"module 'm2dx_clinic' has no attribute {name!r}")
    import importlib

    module, attr = _FUNCTIONS[name]
    function = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = function
    return function


sys.modules[__name__].__class__ = _Package
