"""retnet-train: distributed pretraining of RetNet language models."""
