"""The training engine: what a practitioner imports.

The accumulation window (`window`), losses normalised by the window's item count (`losses`),
the training loop (`trainer`) and its config, checkpoints, schedules, precision, distributed
setup, batching, collation and evaluation. It imports only torch and transformers: nothing
from the data, lab, doctor or UI layers.
"""
