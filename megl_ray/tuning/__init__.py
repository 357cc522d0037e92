"""Ray Tune over Ray Train runs: the sweep, its settings and search spaces, its scheduler and callbacks, its report."""
