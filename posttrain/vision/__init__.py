"""Vision-language models: SFT and DPO on conversations whose messages hold images.

- models.py    what is a vision-language model, loading it with its processor, the built-in
               tiny one (transformers' Llava: a CLIP vision tower, a projector, the tiny
               Qwen2 language model), the frozen vision tower and LoRA on the language model
- images.py    the data stage's side: every row's images checked (file, format, count against
               the image parts) and stored in the data artifact under content hashes
- tokenize.py  rows with images into token ids and pixel values (loss on assistant text only)
- demo.py      the built-in image task (name the square's colour) and its checker
- evaluate.py  held-out images: greedy answers, checker accuracy, samples with their image
"""
