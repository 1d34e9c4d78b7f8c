"""fractalad: FractalAD anomaly detection trained on fractalsynth shards."""
__version__ = "0.1.0"
