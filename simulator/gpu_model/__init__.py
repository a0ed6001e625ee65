"""The GPU kernel model: device time of GEMMs, attention, collectives and memory-bound kernels from
the datasheet and fitted parameters (see `kernels`, `collectives`, `params`, `model`)."""
