"""Expert trajectories: training (``train``) and the one-file-per-expert store (``store``)."""
