"""Data: loading (local files, hub ids), validation, tokenization with loss masks, packing."""
