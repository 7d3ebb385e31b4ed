"""Sources: reading dense source models (Hugging Face folders, shards, GGUF, hub), tokenizers and text.

Used by the converter and by validation alike; imports only the model layer below it.
"""
