"""The streamlearn runtime: config, Kafka ingestion, prequential loop, HTTP, metrics, checkpoints."""
