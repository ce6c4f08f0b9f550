"""The optimizer: Optuna studies over trainer pods, restart-safe."""
