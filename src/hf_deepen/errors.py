"""Errors and warnings.

Every error a user can cause is a :class:`DeepenError` *and* a :class:`ValueError` (as in PEFT), so
``except ValueError`` keeps working, and each message says what to change.
"""


class DeepenError(Exception):
    """Base class of every hf_deepen error."""


class ConfigError(DeepenError, ValueError):
    """An option of :class:`~hf_deepen.UpscaleConfig` is unknown, out of range or inconsistent."""


class PlanError(DeepenError, ValueError):
    """A depth plan cannot be built: positions out of range or duplicated, bad counts."""


class UnsupportedArchitectureError(DeepenError, ValueError):
    """The model's family has no architecture spec, or a tensor of its layers is not understood."""


class UnsupportedModelError(DeepenError, ValueError):
    """The model cannot be upscaled as loaded (quantized weights, no decoder layers...)."""


class AlignmentWarning(UserWarning):
    """An OT plan degenerated: marginals off, or the plan costs more than leaving units in place."""
