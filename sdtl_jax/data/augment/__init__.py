"""Augmentation: DINO multi-crop (the recipe's), the eval view, Table 1's pipelines as grain
transforms on the host, and the parts that run on the device inside the train step
(`photometric`, `normalize`).
"""
