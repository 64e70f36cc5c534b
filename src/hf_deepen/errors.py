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


class ModelNotFoundError(DeepenError, ValueError):
    """The model argument is neither an existing directory nor a Hub id."""


class CheckpointError(DeepenError, ValueError):
    """A checkpoint on disk is damaged: a truncated or unreadable shard, an index that disagrees with
    its shards, tensors whose shapes disagree with the config."""


class WeightError(DeepenError, ValueError):
    """The weights themselves cannot be used: NaN or inf where OT or averaging would read them."""


class OutputError(DeepenError, OSError):
    """The output cannot be written: disk full, read-only or not writable, or another run writing it."""

    def __str__(self) -> str:  # OSError's own __str__ would print "[Errno ...]" from the args
        return str(self.args[0]) if self.args else ""


class Interrupted(KeyboardInterrupt):
    """A run ended by SIGTERM or SIGHUP, raised like Ctrl-C so the same cleanup runs."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class AlignmentWarning(UserWarning):
    """An OT plan degenerated: marginals off, or the plan costs more than leaving units in place."""


class LayoutWarning(UserWarning):
    """``layout="auto"`` could not run its calibration pass (no tokenizer for the default text) and used
    the uniform layout, its result on a flat profile."""
