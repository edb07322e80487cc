"""Supervised fine-tuning: conversations -> masked ids -> packed batches -> trainer.

``dataset`` (reading, tokenizing, packing, collating) knows nothing of the
trainer; ``trainer`` is a plain loop over it; ``checkpoint`` writes and reads
sharded checkpoints (and consolidates them); ``memory`` estimates and measures
memory per rank; ``distributed`` is the process group; ``config`` holds the
flags and YAML recipes; ``cli`` is the thin `vicuna train` shim. Errors live in
``vicuna.errors`` (TrainError, TrainInputError).
"""
