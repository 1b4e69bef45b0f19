"""The lesson lab: the experiments the notebooks call.

Equivalence, numerics, noise, the memory model and planner, long sequences, large batches,
variable lengths, the parallel lab, throughput, framework semantics and fine-tuning helpers.
A new lesson backend goes here, as one module that imports the engine and data.
"""
