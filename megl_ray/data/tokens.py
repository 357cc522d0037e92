"""The two token conventions the data and the model share, in a module that imports nothing: the converter (which
runs under a memory cap, without torch) checks rationales against the image placeholder too."""

IMAGE_TOKEN = "<image>"
"""Where the prompt's image tokens go: a rationale or class name holding it would add image tokens."""
IGNORE_INDEX = -100
"""The label of every position the LM loss skips (prompt, image tokens, padding): PyTorch's and transformers'."""
