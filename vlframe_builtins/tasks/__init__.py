"""Built-in evaluation tasks: captioning, retrieval, zero-shot classification, probes, understanding."""
