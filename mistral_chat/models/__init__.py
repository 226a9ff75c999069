"""Models on disk: the catalogue of aliases, pulls through huggingface_hub, the local registry, list/show/rm."""
