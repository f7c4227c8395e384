"""vallex: train multilingual VALL-E X models on Ray without forgetting old languages."""

__version__ = "0.1.0"
