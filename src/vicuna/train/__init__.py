"""Supervised fine-tuning: conversations -> masked ids -> packed batches -> trainer.

``dataset`` (reading, tokenizing, packing, collating) knows nothing of the
trainer; ``trainer`` is a plain loop over it; ``checkpoint`` writes and reads
sharded checkpoints (and consolidates them); ``memory`` estimates and measures
memory per rank; ``distributed`` is the process group; ``config`` holds the
flags and YAML recipes; ``cli`` is the thin `vicuna train` shim.
"""

from ..errors import UsageError, VicunaError


class TrainError(VicunaError):
    """Training failed (the message says why and what to do)."""


class TrainInputError(UsageError):
    """Bad training input: data file, recipe or flags (exit code 2)."""


__all__ = ["TrainError", "TrainInputError"]
