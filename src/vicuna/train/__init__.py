"""Supervised fine-tuning: conversations -> masked ids -> packed batches -> trainer.

``dataset`` (reading, tokenizing, packing, collating) knows nothing of the
trainer; ``trainer`` is a plain loop over it; ``config`` holds the flags and
YAML recipes; ``cli`` is the thin `vicuna train` shim.
"""

# Transitional: importable here until the branches written before errors.py have landed; import from vicuna.errors.
from ..errors import TrainError, TrainInputError  # noqa: F401
