"""The bundled demo: a synthetic shapes task and a tiny PaliGemma trained on it from scratch."""
