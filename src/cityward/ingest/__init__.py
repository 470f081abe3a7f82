"""Ingestion: device payloads into the data bank (mapping, dead letters; adapters to come)."""
