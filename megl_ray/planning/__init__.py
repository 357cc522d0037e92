"""Planning a run before it starts: the cost model (step time and communication per parallel setup) and the memory
model (bytes per GPU: parameters, gradients and buckets, optimizer state, activations)."""
