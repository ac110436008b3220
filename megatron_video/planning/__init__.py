"""The parallel-layout planner: memory and step-time models of the SUV MMDiT on a cluster."""
