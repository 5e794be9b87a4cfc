"""Built-in text decoders: unimodal (contrastive text embedding) and multimodal (captioning)."""
