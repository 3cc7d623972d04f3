"""Training the embedded model family: tiny GPT-2s on the standard library that differ only in their seed.

`corpus` prepares the data (a BPE tokenizer from `tokenizer`, packed train and validation rows), `trainer` trains
each seed. Nothing here is needed to run a precompute: the precompute reads the stdlib corpus through
`precompute.stdlib_corpus` and loads trained models as ordinary Hugging Face folders.
"""
